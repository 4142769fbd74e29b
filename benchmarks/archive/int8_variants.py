"""INT8 PTQ variants of the backbone-only quantization: image/pixel AUROC on the bottle test set vs torch.

Variants of ``export.quantize_backbone_on_normal_images`` (normal training images calibrate; flow head, scorer and
post-processor stay float), each run with the OpenVINO f32 hint: as shipped; depthwise convolutions
(OpenVINO ``GroupConvolution``) kept float too; nncf's MIXED preset (asymmetric activations); both.

    python benchmarks/archive/int8_variants.py CflowAD path/to/model.ckpt 256

No variant met the 0.005 AUROC tolerance, so the backbone INT8 PTQ (``INT8_PTQ`` / ``INT8_ACQ``) was removed from the
package afterwards; this script needs it: run it at commit c952a2d (``git worktree add``).
"""

import json
import sys
from pathlib import Path
from tempfile import TemporaryDirectory

import nncf
import numpy as np
import openvino as ov
import torch
from anomalib.data import MVTecAD

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness, evaluate, export_parity
import export_parity as ep

import flowad_plugins
import flowad_plugins.export as fe

name, ckpt, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = getattr(flowad_plugins, name).load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
dm = MVTecAD(root="../shared/data/mvtec_ad", category="bottle", train_batch_size=8, eval_batch_size=8,
             num_workers=0, val_split_mode="synthetic", val_split_ratio=0.2, seed=0)
images, masks, labels = ep.load_test_set(dm, size)
with torch.no_grad():
    ref = ep.batched(lambda x: {k: v.numpy() for k, v in model(x)._asdict().items() if v is not None}, images, 8)
ref = {k: v.astype(np.float64) if v.dtype != bool else v for k, v in ref.items()}
print("torch", json.dumps(ep.evaluate(ref, None, masks, labels)), flush=True)
original_scope = fe.backbone_only_scope
variants = {
    "backbone": {},
    "backbone_keep_depthwise": {"types": ["GroupConvolution"]},
    "backbone_mixed": {"preset": nncf.QuantizationPreset.MIXED},
    "backbone_keep_depthwise_mixed": {"types": ["GroupConvolution"], "preset": nncf.QuantizationPreset.MIXED},
}
core = ov.Core()
with TemporaryDirectory() as tmp:
    onnx_path = fe.export_model(model, "onnx", tmp, input_size=(size, size))
    for vname, opts in variants.items():
        def scope(ov_model, onnx, convs, opts=opts):
            s = original_scope(ov_model, onnx, convs)
            return nncf.IgnoredScope(patterns=s.patterns, types=opts.get("types", []), validate=False)
        fe.backbone_only_scope = scope
        kwargs = {"preset": opts["preset"]} if "preset" in opts else {}
        ov_model = fe.quantize_backbone_on_normal_images(model, ov.convert_model(onnx_path), dm, **kwargs)
        compiled = core.compile_model(ov_model, "CPU", fe.openvino_config("f32", 2))
        req = compiled.create_infer_request()
        def run(x, req=req, compiled=compiled):
            r = req.infer({0: x.numpy()})
            return {p.any_name: np.array(r[p]) for p in compiled.outputs}
        row = ep.evaluate(ep.batched(run, images, 8), ref, masks, labels)
        print(vname, json.dumps({k: row[k] for k in row if "AUROC" in k or "auroc" in k}), flush=True)
