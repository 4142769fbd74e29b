"""flowad-plugins: normalizing-flow anomaly detectors (CFLOW-AD, FastFlow, CS-Flow) for anomalib 2.x.

``anomalib train --model flowad_plugins.CflowAD --data anomalib.data.MVTecAD`` or, in Python,
``Engine().fit(flowad_plugins.CflowAD(...), datamodule=...)``.
"""

from flowad_plugins.models import CflowAD, CSFlow, FastFlow

__all__ = ["CSFlow", "CflowAD", "FastFlow"]
__version__ = "0.1.0"
