"""The model zoo as a standing test: repfold on models nobody on the project wrote, as a new user tries it.

    python benchmarks/zoo.py                        # every model (see below); writes benchmarks/results/zoo.{md,json}
    python benchmarks/zoo.py --subset ci            # the ~20 models of tests/test_zoo.py
    python benchmarks/zoo.py --models resnet18,timm:botnet26t_256 --out /tmp/zoo
    python benchmarks/zoo.py --list                 # the generated list and the models left out, with why
    python benchmarks/zoo.py --source timm; python benchmarks/zoo.py --resume   # timm first, then the rest
    python benchmarks/zoo.py --resume --redo timm:tresnet_l                   # run some models again
    python benchmarks/zoo.py --shard 2/4 [--resume]  # every 4th model from the 2nd, into zoo.shard2of4.{json,md}
    python benchmarks/zoo.py --merge                # zoo.{json,md} from zoo.json and every zoo.shard*.json
    python benchmarks/zoo.py --models hf:bert,hf:bert+lora --paths fx,export --out /tmp/zoo
    python benchmarks/zoo.py --models ultralytics:yolov8n,diffusers:unet2d+lora --out /tmp/zoo   # pip install .[zoo]

Which models (generated, never picked by hand)
----------------------------------------------
* torchvision: every model of ``torchvision.models.list_models(module=m)`` for
  the classification, video and segmentation modules (ids ``torchvision:NAME``).
* timm: one model per family, a family being a timm module
  (``timm.list_modules()``, its models ``timm.list_models(module=m)``; ids
  ``timm:NAME``). The rule that picks it: timm's own ``test_*`` configs are not
  candidates; the model whose name holds the earliest size token of
  ``SIZE_TOKENS`` (atto < femto < pico < ... < small; tokens are the name's
  ``_``-separated parts, trailing digits dropped: ``xxs24`` is ``xxs``) wins; names without a size token come after all that
  have one; ties go to the first in natural order (digit runs compared as
  numbers, so ``resnet10t`` comes before ``resnet101``).
* Hugging Face transformers (where it is installed; ids ``hf:FAMILY``): each
  family of ``HF_FAMILIES`` whose config class exists (vision: ViT, DeiT, BEiT,
  DINOv2, CLIP and SigLIP vision towers, Swin, ConvNeXt, SegFormer; text:
  BERT, RoBERTa, Llama, Mistral, Qwen2, Gemma, the T5 encoder), built from a
  small config (2 layers, width 32) with random weights, no download,
  ``return_dict=False`` (True where the model then fails) and
  ``use_cache=False``; a text model reads int64 token ids (batch 1,
  ``HF_SEQ`` tokens), a vision model 1x3x32x32 pixel values. With peft
  installed, each family also as ``hf:FAMILY+lora``: PEFT LoRA (rank 4) on
  every Linear of its repeated blocks (by last name), random non-zero A and B.
* torchvision detection (ids ``torchvision:NAME``, family ``detection``): the six of ``TV_DETECTION``
  (Faster R-CNN MobileNetV3-320, RetinaNet, FCOS, SSDlite, Mask R-CNN, Keypoint R-CNN), ``weights=None,
  weights_backbone=None``, a 3x128x128 image (``min_size = max_size = 128``; SSDlite resizes to 320), score
  threshold ``DETECTION_SCORE``. The whole detector is not traced (data-dependent post-processing): the
  user's path is ``model.backbone = repfold.insert(model.backbone, ...)``, train, ``model.backbone =
  repfold.fold(model.backbone)``, and that is what runs (``run_detection``; fx and export paths only).
* torchvision optical flow (ids ``torchvision:NAME``, family ``optical_flow``): RAFT-small (``TV_FLOW``),
  ``weights=None``, two 1x3x128x128 images (the smallest its 4-level correlation pyramid takes). torch.fx
  cannot trace it (checks on the input sizes); torch.export traces it whole, so it runs as a whole model on every
  path, behind a forward of the two images that runs ``TV_FLOW_UPDATES`` updates and returns the last flow (the
  prediction a user deploys). Adapters: the CNN rule on the convs of its backbone only (``TV_FLOW_BACKBONE``:
  the feature and context encoders), judged on the flow.
* Ultralytics (where it is installed; ids ``ultralytics:NAME``): YOLOv8n, YOLO11n, YOLOv10n, YOLOv8n-seg,
  YOLOv8n-pose from the package's own yaml (``ULTRALYTICS``), random weights, 1x3x64x64, the heads in
  export mode (the deployed predictions only, as ultralytics' exporter sets them); RT-DETR-l too (~4 min), in
  float64 (``FLOAT64``; no ``f32_noise``, nothing to
  measure; its ONNX paths not run, ``FLOAT64_ONNX``: onnxruntime has no float64 Conv), with a longer timeout
  (``TIMEOUTS``). Adapters before convs (the CNN rule below, even where the model has attention-like
  scopes), ``bias=False``; reference merge: the model's own ``fuse()`` of the base. torch.fx cannot trace
  them: ``insert`` and ``fold`` take torch.export's graph.
* diffusers (where it and peft are installed; ids ``diffusers:NAME+lora``): a UNet2DConditionModel and an SD3
  transformer from tiny configs (``DIFFUSERS``) behind a wrapper of positional tensors (sample, timestep,
  text states: several inputs), PEFT LoRA (rank 4, random non-zero A and B) through the model's own
  ``add_adapter``; reference merge: ``fuse_lora()`` then ``unload_lora()``.
* PEFT types (where peft is installed; ids ``peft:TYPE``, family ``toy``): every type of
  ``benchmarks/peft_matrix.py`` (``peft_configs``: LoRA, DoRA, LoHa, LoKr, OFT, BOFT, IA3, VeRA, HRA, FourierFT)
  on one toy model (``peft_toy``) holding each target kind of ``PEFT_KINDS`` once: token ids (1x64) into an
  Embedding, a 1x1 conv, a 3x3 conv of stride 2, a grouped 3x3 conv, a Linear. The config targets every kind the
  type takes (each kind is tried alone first: PEFT wraps it, the model runs, ``merge_and_unload`` runs; the kinds
  it cannot take are named in the row), adapter weights moved by N(0, 0.1) as peft_matrix's ``adapt`` does;
  reference merge: ``merge_and_unload()`` of a copy.
* Left out, each with its reason in zoo.md: by rule ``EXCLUDE_RULES`` (float32
  weights over 1 GB, counted on the meta device without allocating them) and
  by name ``EXCLUDED`` (models that need inputs other than one image/clip).

How each model runs
-------------------
* float32, eval mode, ``pretrained=False`` / ``weights=None`` (and
  ``weights_backbone=None``), seed 0. Every parameter that starts at (nearly)
  zero (biases, heads, LayerScale gammas, position embeddings, relative
  position tables) is made random (biases N(0, 0.02), others N(0, 0.1)), every
  other constant parameter (norm gains, Hiera's 0.02 biases) gets noise of 10%
  of its value, and every BatchNorm gets random running statistics, so no
  adapter effect is hidden by a zero and no exporter shares one initializer
  between equal tensors. This happens before the model's first call, so no
  eval-mode cache (LeViT's attention biases) holds the weights of before.
* Input: batch 1, the smallest size of ``*_SIZES`` that builds and runs (timm:
  ``img_size=`` is passed when the model takes it; torchvision ViT
  ``image_size=``, MaxViT ``input_size=``, MViT ``spatial_size=`` /
  ``temporal_size=``, set on torchvision's private ``_mvit`` for the duration
  of the build, since the public builders fix them at 224 px, 16 frames).
* Adapters (the harness plays the user): ``before=`` every module scope of the
  traced graph whose last name part is attention- or MLP-like (``ATTN_MLP``
  tokens: attn, attention, mlp, ffn, ...; not drop/norm/act/pool/proj/scale
  parts), outermost only, and only scopes that receive exactly one float
  tensor of rank 3 to 5. A model without such scopes is a CNN: adapters go
  before up to 4 dense 1x1 convs and up to 4 dense kxk convs, evenly spread
  over the graph order, with ``bias=False`` adapters when ``repfold.insert``
  takes that keyword. ``groups=2``, retried with ``groups=1`` when a width is
  odd. Adapter weights random (std 0.2). Hugging Face families in
  ``HF_BEFORE`` get the scopes a user of the family names instead (BERT's
  ``attention`` holds its residual add; T5's names are CamelCase); a
  ``+lora`` row gets PEFT's LoRA instead of repfold's adapters.

Paths and checks (one row per model, one cell group per path)
-------------------------------------------------------------
The truth is the user's: the eager model with adapters (the GraphModule
``insert`` returned, or PEFT's model, run in PyTorch: ``ya``); the cost to beat
is the base model's and, where the ecosystem has one, its own merge.

* ``fx``: ``repfold.insert`` / ``repfold.fold`` on the nn.Module (traced by
  torch.fx, or by torch.export where fx fails, as ``insert`` does itself);
  ``onnx``: the TorchScript exporter (``dynamo=False``, opset 17; a Hugging
  Face model behind a one-argument forward, see ``export``);
  ``dynamo``: ``torch.onnx.export(..., dynamo=True)``. ONNX protos are folded
  with ``repfold.fold(proto, return_report=True)`` and run in onnxruntime (CPU);
  ``export``: ``torch.export.export(model with adapters)`` (non-strict), then
  ``repfold.fold(ep)``, run as ``folded.module()``; its operators are the
  program's ATen call_function targets (by operator, in-place as out-of-place:
  ``aten_counts``) against the base model's exported program.
* (a) noop: the fold of the model without adapters gives bitwise equal outputs.
* (b) with adapters: they change the eager output by more than ``EFFECT`` (else
  "no effect"). Three errors, each relative to the reference's max abs:
  the fold's own (``max_err``: the folded artifact against the unfolded one),
  the exporter's own (``export_err``: the unfolded export, run in
  onnxruntime or as the program's module, against eager ``ya``; the base's
  export against the eager base is ``base_export_err``) and the end-to-end
  (``e2e_err``: the folded artifact, the file a user deploys, against eager
  ``ya``; on the fx path the unfolded artifact is the eager model, so
  ``e2e_err`` is ``max_err``). Each is judged against 1e-5 (or, where the
  model's own float32 rounding is larger, ``NOISE_MARGIN`` times that
  rounding: the model's float32 output against its float64 output,
  ``f32_noise``). Every region folds, or is kept with a
  reason; operator counts of the folded model <= the base model's traced or
  exported the same way (ONNX: ``Constant`` not counted) when everything
  folded, else <= the model's with adapters; parameter count <= the base's
  when everything folded (ONNX: ``n_params``, the values of the initializers
  and of float ``Constant`` nodes; an exporter's integer shape constants are
  not parameters) (fewer happens: README, a constant scale of the
  model's own inside a region folds too, e.g. PoolFormer's GroupNorm affine).
  A noop fold that folds anything is reported too ("folded the model's own
  layers"), and so is a report with no region at all for the adapters
  inserted (one region may hold two adapters, around one conv, so fewer
  regions than adapters is no fault by itself).
* (b') against the reference merge, made and counted the same way as the
  folded artifact (traced as ``fold`` traces a module, exported by the same
  exporter): PEFT's ``merge_and_unload()`` for a ``+lora`` row (diffusers': ``fuse_lora()`` then
  ``unload_lora()``), ultralytics' ``fuse()`` of the base (like timm's, without the adapters), timm's
  ``reparameterize_model`` of the base for a timm model with a module that has
  ``fuse`` / ``reparameterize`` / ``switch_to_deploy`` (where a region is kept,
  a kept adapter runs and says why: then the fold of the base stands against
  timm's merge, ``ref_of``). More operators or parameters (beyond biases new
  layers took) than the reference is "over reference".
* (c) the fold time of the model with adapters.
* axis: each adapter's width must equal the width of the channel axis of
  the nearest Linear/Conv/MultiheadAttention that reads its value through
  shape-keeping ops (else the nearest that wrote it); a mismatch is a "wrong
  axis" (``axis_check``).

A path's status, the worst that holds (``judge``): ``crash`` (repfold raised,
or its output does not run); ``wrong`` (a noop that is not bitwise, a fold
error over tolerance, or an end-to-end error over tolerance where the
exporter is faithful); ``unfaithful export`` (the exporter's own error over
tolerance: the user's file is off, not by the fold; a finding, and a repfold
defect where the base's export is faithful, which ``problems`` says);
``over reference``; ``over base``; ``export failed`` (the exporter fails on
the model with adapters); ``not traceable`` (torch.fx or the exporter fails on
the model itself, before repfold); ``no adapters`` (no scope to put one);
``ok``. zoo.md sums them per path and, per ecosystem (torchvision, timm, hf,
hf + peft, ultralytics, diffusers + peft), counts the models exact against eager on every path, within the
base's and the reference's cost on every path, with an unfaithful exporter,
wrong, or crashed. Each model runs in its own
process with a timeout (``--timeout``, or ``TIMEOUTS``' where longer), so nothing stops the run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SIZE_TOKENS = ("atto", "femto", "pico", "micro", "nano", "xxxs", "xxs", "xx", "xs", "xsmall",
               "tiny", "t", "mini", "small", "s")
MAX_WEIGHT_BYTES = 1 << 30  # float32 weights over this are left out

EXCLUDE_RULES = {
    "weights": "float32 weights over 1 GB (parameters counted on the meta device)",
    "timm-test": "timm's test_* configs are test fixtures, never a family's pick",
}
# Models that need inputs other than one image (or clip); by id.
EXCLUDED: dict[str, str] = {}

TV_CLS_SIZES = (32, 64, 96, 128, 160, 224, 299)
TV_SEG_SIZES = (32, 64, 96, 128)
TV_VIDEO_SIZES = ((4, 32), (4, 64), (8, 64), (8, 112), (16, 112), (16, 224))  # (frames, pixels)
TIMM_SIZES = (32, 64, 96, 128, 160, 192, 224, 256)  # then the model's pretrained_cfg input size
# torchvision builders that take the input size (their position embeddings or partitions depend on it)
TV_SIZE_KWARGS = {
    "vit_": lambda s: {"image_size": s},
    "maxvit_": lambda s: {"input_size": (s, s)},
    "mvit_": lambda ts: {"temporal_size": ts[0], "spatial_size": (ts[1], ts[1])},  # see _tv_builder
}

ATTN_MLP = {"attn", "attention", "selfattn", "mlp", "ffn", "feedforward", "ff"}
NOT_ATTN_MLP = {"drop", "dropout", "norm", "layernorm", "act", "pool", "proj", "scale", "ls", "gamma", "bias", "gate",
                "head"}
MAX_CONVS = 4  # per kind (1x1, kxk) in a CNN
TOL = 1e-5
NOISE_MARGIN = 10  # a fold error within this many times the model's own float32 rounding is rounding too
EFFECT = 1e-4  # the adapters must move the output by more than this (10x TOL), relative, or "no effect"
PATHS = ("fx", "onnx", "dynamo", "export")
# fx ops that only read or check shapes (no tensor work), not counted against a reference merge: the fold keeps
# the asserts of branches it folded (they are effects), a merge that rewrote the module has none (LCNet-V2)
FX_SHAPE_OPS = ("getattr", "_assert", "eq", "size", "dim")
ONNX_PATHS = ("onnx", "dynamo")
# A path's statuses, worst first (``judge``); the first three come from a stage that raised.
STATUSES = ("crash", "wrong", "unfaithful export", "over reference", "over base", "export failed", "not traceable",
            "no adapters", "ok")

# The fixed subset of tests/test_zoo.py (`--subset ci`): families spread wide, small members.
CI_SUBSET = (
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:vit_b_32",
    "torchvision:swin_t",
    "torchvision:convnext_tiny",
    "torchvision:efficientnet_b0",
    "torchvision:lraspp_mobilenet_v3_large",
    "torchvision:r3d_18",
    "torchvision:mvit_v2_s",
    "timm:vit_tiny_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
    "timm:convnext_atto",
    "timm:resnet10t",
    "timm:efficientnet_b0",
    "timm:mvitv2_tiny",
    "timm:botnet26t_256",
    "timm:resnext26ts",
    "timm:xcit_nano_12_p8_224",
    "timm:pvt_v2_b0",
    "timm:poolformer_s12",
    "timm:levit_128s",
    "hf:vit",
    "hf:bert",
)
# Hugging Face transformers rows of the CI subset (only where transformers is installed): fx only.
CI_HF = ("hf:vit", "hf:bert")
# Paths per CI model (fx and TorchScript where not listed): the dynamo exporter takes 10-60 s a model on 2
# cores; the torch.export path runs on two.
CI_PATHS = {m: ("fx", "onnx") for m in CI_SUBSET}
CI_PATHS.update({m: PATHS for m in ("torchvision:resnet18", "timm:vit_tiny_patch16_224")})
CI_PATHS.update({m: ("fx",) for m in CI_HF})
# fx only: ViT-B/32's export is most of its time (88M weights), torchvision MViT's TorchScript export fails in
# onnxruntime, timm MViT-v2's export is slow (the file stays under 5 minutes on 2 shared cores)
CI_PATHS.update({m: ("fx",) for m in ("torchvision:vit_b_32", "torchvision:mvit_v2_s", "timm:mvitv2_tiny")})


# Hugging Face transformers families, built from small configs with random weights (no download):
# family -> (input kind, config class, model class or None for AutoModel, config keywords).
_HF_VISION = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 32, "patch_size": 8}
_HF_TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "vocab_size": 100}
_HF_DECODER = {**_HF_TEXT, "num_key_value_heads": 2}
HF_FAMILIES: dict[str, tuple[str, str, str | None, dict]] = {
    "vit": ("vision", "ViTConfig", None, _HF_VISION),
    "deit": ("vision", "DeiTConfig", None, _HF_VISION),
    "beit": ("vision", "BeitConfig", None, _HF_VISION),
    "dinov2": ("vision", "Dinov2Config", None, {**_HF_VISION, "mlp_ratio": 2}),
    "clip": ("vision", "CLIPVisionConfig", "CLIPVisionModel", _HF_VISION),
    "siglip": ("vision", "SiglipVisionConfig", "SiglipVisionModel", _HF_VISION),
    "swin": ("vision", "SwinConfig", None, {"image_size": 32, "patch_size": 2, "embed_dim": 16, "depths": [1, 1],
                                            "num_heads": [1, 2], "window_size": 4}),
    "convnext": ("vision", "ConvNextConfig", None, {"image_size": 32, "hidden_sizes": [16, 32], "depths": [1, 1],
                                                    "num_stages": 2}),
    "segformer": ("vision", "SegformerConfig", None, {
        "image_size": 32, "num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [16, 32],
        "patch_sizes": [7, 3], "strides": [4, 2], "num_attention_heads": [1, 2], "mlp_ratios": [2, 2]}),
    "bert": ("text", "BertConfig", None, _HF_TEXT),
    "roberta": ("text", "RobertaConfig", None, _HF_TEXT),
    "llama": ("text", "LlamaConfig", None, _HF_DECODER),
    "mistral": ("text", "MistralConfig", None, _HF_DECODER),
    "qwen2": ("text", "Qwen2Config", None, _HF_DECODER),
    "gemma": ("text", "GemmaConfig", None, {**_HF_DECODER, "head_dim": 8}),
    "t5": ("text", "T5Config", "T5EncoderModel", {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                                                  "num_heads": 4, "vocab_size": 100}),
}
# Where the rule's scopes are not the family's attention and MLP inputs, the scopes a user of the family names
# (BERT's "attention" holds the residual add of its output, so its input is the residual stream; T5's names
# are CamelCase words the rule does not split; ConvNeXt's blocks have no such scope, and the CNN rule finds
# only its downsampling conv).
HF_BEFORE = {"bert": ["self", "intermediate"], "roberta": ["self", "intermediate"],
             "t5": ["SelfAttention", "DenseReluDense"], "convnext": ["pwconv1", "pwconv2"]}
HF_SEQ = 16  # token ids per text input (batch 1), drawn from [5, 90)
LORA_RANK = 4

# Other ecosystems, each only where its package is installed (``pip install -e ".[zoo]"``), built from the
# package's own yaml or a small config with random weights, never downloaded.
# Ultralytics: name -> (task model class of ultralytics.nn.tasks, yaml); input 1x3x64x64; reference merge:
# the model's own ``fuse()`` (BatchNorms into convs, RepVGG-like branches summed), of the base.
ULTRALYTICS = {
    "yolov8n": ("DetectionModel", "yolov8n.yaml"),
    "yolo11n": ("DetectionModel", "yolo11n.yaml"),
    "yolov10n": ("DetectionModel", "yolov10n.yaml"),
    "yolov8n-seg": ("SegmentationModel", "yolov8n-seg.yaml"),
    "yolov8n-pose": ("PoseModel", "yolov8n-pose.yaml"),
    "rtdetr-l": ("RTDETRDetectionModel", "rtdetr-l.yaml"),
}
ULTRALYTICS_SIZE = 64
# Not in the list (run them by id, ``--models ultralytics:rtdetr-l``), with why.
# (RT-DETR-l was, at 234 s before its first path; now ~4 min in all on 2 shared cores: fold is faster, its
# float64 noise estimate and its ONNX paths, which onnxruntime cannot run in float64, are skipped; TIMEOUTS.)
ULTRALYTICS_UNLISTED: dict[str, str] = {}
# Models judged in float64 (weights, inputs, adapters), with why: float32 rounding alone moves their output by
# far more than the tolerance.
FLOAT64 = {"ultralytics:rtdetr-l": "RT-DETR's top-k query selection turns float32 rounding (any reordering of "
                                   "the arithmetic) into 7e-3 differences; judged in float64"}
# A float64 model's ONNX paths are not run: onnxruntime's CPU provider has no float64 Conv kernel, so its export
# (of the base, as of the model with adapters) cannot run there ("Could not find an implementation for Conv(11)");
# the paths are recorded "not traceable" at that stage without the minute their exports take.
FLOAT64_ONNX = "onnxruntime (CPU) has no float64 Conv kernel: the float64 model's ONNX file cannot run there"
# Per-model timeouts (seconds) over ``--timeout`` where a row needs more, with why.
TIMEOUTS = {"ultralytics:rtdetr-l": (900, ("each repfold.fold of RT-DETR-l in float64 takes ~40 s (three on the fx "
                                           "path, three on the export path): ~6 min alone, more on shared cores"))}
# diffusers: name -> (model class, config, LoRA target module names); each row is ``diffusers:NAME+lora``:
# PEFT LoRA through ``add_adapter`` (random non-zero A and B), folded by repfold.fold against diffusers' own
# ``fuse_lora()`` then ``unload_lora()``. The model is called through a wrapper of positional tensors
# (``DIFFUSERS_INPUTS``) returning ``model(..., return_dict=False)[0]``.
DIFFUSERS = {
    "unet2d": ("UNet2DConditionModel", {
        "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32, "attention_head_dim": 8,
        "norm_num_groups": 8}, ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in"]),
    "sd3": ("SD3Transformer2DModel", {
        "sample_size": 8, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
        "pooled_projection_dim": 16, "pos_embed_max_size": 16}, ["to_q", "to_k", "to_v", "to_out.0"]),
}
# the wrapper's positional inputs -> the model's keywords
DIFFUSERS_INPUTS = {"unet2d": ("sample", "timestep", "encoder_hidden_states"),
                    "sd3": ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")}
ECO_SOURCES = ("ultralytics", "diffusers")
# torchvision detection (ids torchvision:NAME, family "detection"): the whole detector is not traced (torch.fx:
# control flow on its inputs; torch.export: post-processing whose sizes depend on the data, proposals kept by
# score, NMS), so the user inserts into and folds its backbone (BackboneWithFPN, SSD's feature extractor) and
# runs the detector with it in PyTorch: the fx and export paths of the backbone, judged on its features and
# on the detector's outputs (where it detects anything: random weights may give no box above the threshold).
TV_DETECTION = ("fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
                "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")
TV_DETECTION_SIZE = 128  # the image, and min_size = max_size where the builder takes them (SSDlite: 320 fixed)
DETECTION_PATHS = ("fx", "export")
DETECTION_SCORE = 1e-3  # box_score_thresh / score_thresh: random weights score every class ~1 / 91
WHOLE_DETECTOR = ("the whole detector is not traced: data-dependent post-processing (proposals and boxes kept by "
                  "score, NMS); its backbone is inserted into and folded, the detector run with it")
# torchvision optical flow (ids torchvision:NAME, family "optical_flow"): RAFT takes two images and returns one
# flow per update; torch.fx cannot trace it (checks on the input sizes), torch.export can, whole. The row runs the
# whole model (every path) behind a wrapper of the two images that runs ``TV_FLOW_UPDATES`` updates and returns
# the last flow (the prediction a user deploys), with the CNN rule's adapters in its backbone only, the feature and
# context encoders (``TV_FLOW_BACKBONE``). 128 px: the smallest input its 4-level correlation pyramid takes.
TV_FLOW = ("raft_small",)
TV_FLOW_SIZE = 128
TV_FLOW_UPDATES = 2
TV_FLOW_BACKBONE = ("inner.feature_encoder.", "inner.context_encoder.")
# PEFT types x target kinds (ids peft:TYPE, where peft is installed): every tuner type of
# ``benchmarks/peft_matrix.py``'s ``configs`` on one toy model (``PeftToy``) that holds each target kind once, by
# module name; the config targets every kind the type takes (``peft_adapted`` tries each kind alone first: a
# kind PEFT refuses, or cannot merge, is left out and named in the row).
PEFT_KINDS = {"embed": "Embedding", "pw": "1x1 conv", "down": "3x3 conv, stride 2", "group": "grouped 3x3 conv",
              "fc": "Linear"}
PEFT_TOY = {"vocab": 64, "dim": 16, "side": 8}  # token ids (batch 1, side*side of them) -> a 16 x 8 x 8 map


# ----------------------------------------------------------------------------------------------- model list

def natural_key(name: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def size_rank(name: str) -> int:
    parts = {re.sub(r"\d+$", "", p) for p in name.lower().split("_")}  # xxs24 -> xxs
    ranks = [i for i, t in enumerate(SIZE_TOKENS) if t in parts]
    return min(ranks) if ranks else len(SIZE_TOKENS)


def timm_families() -> list[tuple[str, str]]:
    """(family, the model picked for it) for every timm module with models; the rule is in the docstring."""
    import timm

    out = []
    for module in timm.list_modules():
        names = [n for n in timm.list_models(module=module) if not n.startswith("test_")]
        if names:
            out.append((module, min(names, key=lambda n: (size_rank(n), natural_key(n)))))
    return out


def torchvision_models() -> list[tuple[str, str]]:
    import torchvision.models as tvm

    mods = {"classification": tvm, "video": tvm.video, "segmentation": tvm.segmentation}
    return [(kind, name) for kind, mod in mods.items() for name in tvm.list_models(module=mod)]


def hf_models() -> list[dict]:
    """The Hugging Face rows (none without transformers): per family of ``HF_FAMILIES`` that builds from its
    config class, ``hf:FAMILY`` (repfold's adapters) and, with peft installed, ``hf:FAMILY+lora``."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return []
    import transformers

    lora = importlib.util.find_spec("peft") is not None
    rows = []
    for family, (_, config, model_class, _) in HF_FAMILIES.items():
        if not hasattr(transformers, config) or (model_class and not hasattr(transformers, model_class)):
            continue
        rows.append({"id": f"hf:{family}", "source": "hf", "family": family})
        if lora:
            rows.append({"id": f"hf:{family}+lora", "source": "hf", "family": family, "variant": "lora"})
    return rows


def eco_models() -> list[dict]:
    """The rows of the other ecosystems (ultralytics, diffusers), each only where its package is installed."""
    import importlib.util

    rows = []
    if importlib.util.find_spec("ultralytics") is not None:
        rows += [{"id": f"ultralytics:{n}", "source": "ultralytics", "family": ULTRALYTICS[n][0]}
                 for n in ULTRALYTICS if n not in ULTRALYTICS_UNLISTED]
    if importlib.util.find_spec("diffusers") is not None and importlib.util.find_spec("peft") is not None:
        rows += [{"id": f"diffusers:{n}+lora", "source": "diffusers", "family": n, "variant": "lora"}
                 for n in DIFFUSERS]
    return rows


def eco_entry(model_id: str) -> dict:
    source, _, bare = model_id.partition(":")
    name, plus, variant = bare.partition("+")
    if source == "ultralytics" and name in ULTRALYTICS and not plus:
        return {"id": model_id, "source": source, "family": ULTRALYTICS[name][0]}
    if source == "diffusers" and name in DIFFUSERS and variant == "lora":
        return {"id": model_id, "source": source, "family": name, "variant": "lora"}
    raise SystemExit(f"unknown model {model_id!r}: ultralytics:NAME (" + ", ".join(ULTRALYTICS)
                     + ") or diffusers:NAME+lora (" + ", ".join(DIFFUSERS) + ")")


def model_list() -> list[dict]:
    """Every model the zoo tries: {id, source, family[, variant]}, torchvision first, then timm by family, then
    Hugging Face transformers."""
    rows = [{"id": f"torchvision:{n}", "source": "torchvision", "family": k} for k, n in torchvision_models()]
    rows += [{"id": f"torchvision:{n}", "source": "torchvision", "family": "detection"} for n in TV_DETECTION]
    rows += [{"id": f"torchvision:{n}", "source": "torchvision", "family": "optical_flow"} for n in TV_FLOW]
    rows += [{"id": f"timm:{n}", "source": "timm", "family": f} for f, n in timm_families()]
    return rows + hf_models() + eco_models() + peft_models()


def peft_configs() -> dict:
    """PEFT type -> (config maker of a target list, whether PEFT has a conv form): ``benchmarks/peft_matrix.py``'s
    ``configs``, the types that matrix covers (each merges by ``merge_and_unload``)."""
    import peft

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import peft_matrix

    return peft_matrix.configs(peft)


def peft_models() -> list[dict]:
    """The rows ``peft:TYPE`` (none without peft): each type of ``peft_configs`` on the toy model ``PeftToy``."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return []
    return [peft_entry(f"peft:{t}") for t in peft_configs()]


def peft_entry(model_id: str) -> dict:
    kind = model_id.partition(":")[2]
    types = peft_configs()
    if kind not in types:
        raise SystemExit(f"unknown PEFT row {model_id!r}: peft:TYPE, TYPE one of " + ", ".join(types))
    return {"id": model_id, "source": "peft", "family": "toy", "peft_type": kind}


def hf_entry(model_id: str) -> dict:
    family, plus, variant = model_id.partition(":")[2].partition("+")
    if family not in HF_FAMILIES or (plus and variant != "lora"):
        raise SystemExit(f"unknown Hugging Face model {model_id!r}: hf:FAMILY or hf:FAMILY+lora, FAMILY one of "
                         + ", ".join(HF_FAMILIES))
    return {"id": model_id, "source": "hf", "family": family, **({"variant": "lora"} if plus else {})}


def ecosystem(row: dict) -> str:
    """The ecosystem a row's model and reference merge come from (zoo.md's summary by ecosystem)."""
    if row.get("source") == "peft":
        return "peft types"
    return f"{row.get('source', '?')} + peft" if row.get("variant") == "lora" else row.get("source", "?")


def resolve(name: str, listed: list[dict]) -> dict:
    """An entry for ``name`` (an id, or a bare name: torchvision's first, then timm's)."""
    by_id = {r["id"]: r for r in listed}
    if name in by_id:
        return by_id[name]
    if name.startswith("hf:"):
        return hf_entry(name)
    if name.startswith("peft:"):
        return peft_entry(name)
    if name.partition(":")[0] in ECO_SOURCES:
        return eco_entry(name)
    for prefix in ("torchvision:", "timm:"):
        if prefix + name in by_id:
            return by_id[prefix + name]
    source, _, bare = name.rpartition(":")
    import timm

    if source in ("", "timm") and timm.is_model(bare):
        return {"id": f"timm:{bare}", "source": "timm", "family": _family(f"timm:{bare}")}
    for kind, n in torchvision_models():
        if n == bare and source in ("", "torchvision"):
            return {"id": f"torchvision:{n}", "source": "torchvision", "family": kind}
    raise SystemExit(f"unknown model {name!r}")


# ----------------------------------------------------------------------------------------------- building

def _tv_builder(name: str, kind: str):
    import torchvision.models as tvm

    def build(size):
        kw = {"weights": None}
        if kind == "segmentation":
            kw["weights_backbone"] = None
        for prefix, f in TV_SIZE_KWARGS.items():
            if name.startswith(prefix):
                kw.update(f(size))
        if not name.startswith("mvit_"):
            return tvm.get_model(name, **kw)
        # torchvision's mvit_v1_b / mvit_v2_s pass spatial_size=(224, 224), temporal_size=16 to their
        # private _mvit themselves; the sizes (position embeddings) are set there for a small clip instead
        from torchvision.models.video import mvit

        original = mvit._mvit
        mvit._mvit = lambda **k: original(**{**k, "spatial_size": kw.pop("spatial_size"),
                                             "temporal_size": kw.pop("temporal_size")})
        try:
            return tvm.get_model(name, weights=None)
        finally:
            mvit._mvit = original

    return build


def _input(entry: dict, size):
    import torch

    gen = torch.Generator().manual_seed(1)
    if entry["source"] == "diffusers":  # the wrapper's inputs (``DIFFUSERS_INPUTS``)
        cfg = DIFFUSERS[entry["family"]][1]
        n, c = cfg["sample_size"], cfg["in_channels"]
        width = cfg.get("cross_attention_dim") or cfg["joint_attention_dim"]
        made = {"sample": torch.randn(1, c, n, n, generator=gen), "timestep": torch.tensor([10]),
                "encoder_hidden_states": torch.randn(1, 6, width, generator=gen)}
        made["hidden_states"] = made["sample"]
        if "pooled_projection_dim" in cfg:
            made["pooled_projections"] = torch.randn(1, cfg["pooled_projection_dim"], generator=gen)
        return tuple(made[k] for k in DIFFUSERS_INPUTS[entry["family"]])
    if entry["source"] == "peft":
        return torch.randint(0, PEFT_TOY["vocab"], (1, PEFT_TOY["side"] ** 2), generator=gen)
    if entry["source"] == "ultralytics":
        size = ULTRALYTICS_SIZE
    if entry["source"] == "hf":
        if HF_FAMILIES[entry["family"]][0] == "text":
            return torch.randint(5, 90, (1, HF_SEQ), generator=gen)
        size = HF_FAMILIES[entry["family"]][3]["image_size"]
    if entry["family"] == "optical_flow":
        return tuple(torch.randn(1, 3, size, size, generator=gen) for _ in range(2))
    if entry["family"] == "video":
        t, s = size
        return torch.randn(1, 3, t, s, s, generator=gen)
    return torch.randn(1, 3, size, size, generator=gen)


def weight_bytes(entry: dict) -> int | None:
    """float32 bytes of the model's parameters, counted on the meta device (None when that fails)."""
    import torch

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = _make(entry, None)
        return 4 * sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 (a model that cannot even count its weights: size unknown)
        return None


def hf_model(family: str, return_dict: bool = False):
    """A Hugging Face model of ``family`` from its small config (random weights), returning a tuple
    (``return_dict=False``; ``build`` retries with True where a model then fails: DINOv2, Swin and ConvNeXt
    read their encoder's output by name) and no cache (``use_cache=False``), so that it traces and exports."""
    import transformers

    _, config, model_class, kw = HF_FAMILIES[family]
    cfg = getattr(transformers, config)(**kw)
    cfg.return_dict = return_dict
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    if model_class:
        return getattr(transformers, model_class)(cfg)
    return transformers.AutoModel.from_config(cfg)


def eco_model(entry: dict):
    """An ultralytics model from its yaml, or a diffusers model (behind ``Positional``) from its config."""
    import torch

    if entry["source"] == "ultralytics":
        os.environ.setdefault("YOLO_OFFLINE", "1")  # never a download, nor a settings check online
        from ultralytics.nn import tasks

        cls, yaml = ULTRALYTICS[entry["id"].partition(":")[2]]
        with contextlib.redirect_stdout(io.StringIO()):
            model = getattr(tasks, cls)(yaml, verbose=False)
        # the heads as ultralytics' own exporter sets them: the deployed predictions only, not beside them the
        # raw maps of the training-only branches (YOLOv10's one-to-many head, which its fuse() drops)
        for m in model.modules():
            if isinstance(getattr(m, "export", None), bool):
                m.export = True
        return model
    import diffusers

    cls, cfg, _ = DIFFUSERS[entry["family"]]
    names = DIFFUSERS_INPUTS[entry["family"]]

    class Wrapped(torch.nn.Module):
        """The model behind a forward of positional tensors returning its first output, as a user wraps it to
        trace or export it."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args)), return_dict=False)[0]

    return Wrapped(getattr(diffusers, cls)(**cfg))


def flow_model(name: str):
    """A torchvision optical flow model (``weights=None``) behind a forward of the two images that runs
    ``TV_FLOW_UPDATES`` updates and returns the last flow, as a user wraps it to export it."""
    import torch
    import torchvision.models as tvm

    class Flow(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image1, image2):
            return self.inner(image1, image2, num_flow_updates=TV_FLOW_UPDATES)[-1]

    return Flow(tvm.get_model(name, weights=None))


def peft_toy():
    """The toy model of the ``peft:TYPE`` rows: each target kind of ``PEFT_KINDS`` once, by name. Token ids
    (batch 1, side*side of them) -> ``embed`` (Embedding) -> a dim x side x side map -> ``pw`` (1x1 conv) ->
    ReLU -> ``down`` (3x3 conv, stride 2) -> ReLU -> ``group`` (3x3 conv, 4 groups) -> ReLU -> ``fc`` (Linear on
    the channels of each position): a (1, positions, 10) output."""
    import torch
    from torch import nn

    vocab, dim, side = PEFT_TOY["vocab"], PEFT_TOY["dim"], PEFT_TOY["side"]

    class PeftToy(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.pw = nn.Conv2d(dim, 16, 1)
            self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
            self.group = nn.Conv2d(16, 16, 3, padding=1, groups=4)
            self.fc = nn.Linear(16, 10)

        def forward(self, ids):
            h = self.embed(ids).transpose(1, 2).unflatten(2, (side, side))
            h = torch.relu(self.down(torch.relu(self.pw(h))))
            h = torch.relu(self.group(h))
            return self.fc(h.flatten(2).transpose(1, 2))

    return PeftToy()


def _make(entry: dict, size):
    """The model at ``size`` (None: its default)."""
    bare = entry["id"].partition(":")[2]
    if entry["source"] == "peft":
        return peft_toy()
    if entry["source"] in ECO_SOURCES:
        return eco_model(entry)
    if entry["source"] == "hf":
        return hf_model(entry["family"])
    if entry["family"] == "optical_flow":
        return flow_model(bare)
    if entry["source"] == "torchvision":
        kind = entry["family"]
        if size is None:
            import torchvision.models as tvm

            return tvm.get_model(bare, weights=None, **({"weights_backbone": None} if kind == "segmentation" else {}))
        return _tv_builder(bare, kind)(size)
    import timm

    if size is None:
        return timm.create_model(bare, pretrained=False)
    return timm.create_model(bare, pretrained=False, img_size=size)


def build(entry: dict):
    """(model, x, note): the model built and run at the smallest size that works, random non-zero weights."""
    import torch

    bare = entry["id"].partition(":")[2]
    errors = []
    if entry["source"] in ECO_SOURCES:
        candidates = [("config", lambda: eco_model(entry))]
    elif entry["source"] == "peft":
        candidates = [("toy", peft_toy)]
    elif entry["source"] == "hf":
        candidates = [("config", lambda: hf_model(entry["family"])),
                      ("config, return_dict=True", lambda: hf_model(entry["family"], return_dict=True))]
    elif entry["family"] == "optical_flow":
        candidates = [(TV_FLOW_SIZE, lambda: flow_model(bare))]
    elif entry["source"] == "torchvision":
        sizes = {"video": TV_VIDEO_SIZES, "segmentation": TV_SEG_SIZES}.get(entry["family"], TV_CLS_SIZES)
        sized = any(bare.startswith(p) for p in TV_SIZE_KWARGS)
        fixed = None if sized else _make(entry, None)
        candidates = [(s, (lambda s=s: _make(entry, s)) if sized else (lambda: fixed)) for s in sizes]
    else:
        import timm

        try:
            torch.manual_seed(0)
            first = timm.create_model(bare, pretrained=False, img_size=TIMM_SIZES[0])
            takes_size = True
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            first, takes_size = timm.create_model(bare, pretrained=False), False
        cfg_size = first.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        sizes = list(TIMM_SIZES) + ([cfg_size] if cfg_size not in TIMM_SIZES else [])
        if takes_size:
            candidates = [(TIMM_SIZES[0], lambda: first)] + [
                (s, lambda s=s: timm.create_model(bare, pretrained=False, img_size=s)) for s in sizes[1:]]
        else:
            candidates = [(s, lambda: first) for s in sizes]
    for size, make in candidates:
        try:
            torch.manual_seed(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = make().eval()
            # before the first call: eval-mode caches (LeViT's, EfficientFormer's, TinyViT's attention biases)
            # would otherwise keep the weights of before, and eager would disagree with every trace
            randomize(model)
            x = _input(entry, size)
            if entry["id"] in FLOAT64:
                model = model.double()
                x = tuple(a.double() if a.is_floating_point() else a for a in _args(x))
                x = x if len(x) > 1 else x[0]
            with torch.no_grad():
                model(*_args(x))
        except Exception as e:  # noqa: BLE001 (each size that fails is noted, then the next is tried)
            errors.append(f"{size}: {_line(e)}")
            continue
        with torch.no_grad():
            y = flat(model(*_args(x)))
        if not all(torch.isfinite(t).all() for t in y):
            raise RuntimeError(f"non-finite output at size {size}")
        return model, x, ", ".join("x".join(map(str, a.shape)) for a in _args(x))
    raise RuntimeError("no input size works: " + "; ".join(errors[-3:]))


def randomize(model) -> None:
    """Random non-zero weights where a fresh model has zeros; random BatchNorm statistics."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or not p.numel():
                continue
            if p.abs().max() < 1e-3:
                std = 0.02 if name.endswith("bias") else 0.1
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                # a constant (norm gains of 1, Hiera's biases of 0.02): made to vary, or an exporter would
                # share one initializer between equal tensors, and no fold could keep that
                p.add_(torch.randn(p.shape, generator=gen) * 0.1 * p.abs().max())
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def randomize_adapters(gm, std: float = 0.2, seed: int = 2) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if n.startswith("repfold_adapters."):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# ----------------------------------------------------------------------------------------------- helpers

def _args(x) -> tuple:
    """A model's inputs as a tuple: ``x`` is one tensor, or a tuple of them (a diffusers UNet's sample,
    timestep and text states)."""
    return x if isinstance(x, tuple) else (x,)


def flat(y) -> list:
    import torch

    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (list, tuple)):
        return [t for v in y for t in flat(v)]
    return []


def rel_err(got: list, ref: list) -> float:
    """Largest absolute difference over all outputs, relative to the reference's largest magnitude."""
    import numpy as np

    if len(got) != len(ref):
        return math.inf
    worst, scale = 0.0, 0.0
    for a, b in zip(got, ref):
        a, b = np.asarray(_np(a), np.float64), np.asarray(_np(b), np.float64)
        if a.shape != b.shape:
            return math.inf
        if a.size:
            worst, scale = max(worst, float(np.abs(a - b).max())), max(scale, float(np.abs(b).max()))
    return worst / max(scale, 1e-30)


def bitwise(got: list, ref: list) -> bool:
    import numpy as np

    return len(got) == len(ref) and all(np.array_equal(_np(a), _np(b)) for a, b in zip(got, ref))


def _np(t):
    import torch

    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t


def _line(e: BaseException, n: int = 200) -> str:
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()  # no terminal colours
    text = f"{type(e).__name__}: {msg[0] if msg else ''}".strip()
    return text if len(text) <= n else text[: n - 3] + "..."


def short(reason: str | None, n: int = 90) -> str:
    """The why of a kept region, without the node names that make every reason unique."""
    reason = re.sub(r"\s+", " ", reason or "?").rpartition("; ")[2]
    reason = re.sub(r"^\S+ \([^)]*\) ", "", reason)  # "<node> (<op>) why" -> "why"
    reason = re.sub(r"\S+ \(([^)]*)\)", r"\1", reason)  # "<node> (<op>)" -> "<op>"
    reason = re.sub(r"is a \d+x\d+ map", "is an NxN map", reason)
    return reason if len(reason) <= n else reason[: n - 1] + "…"


# torch.nn modules as the function torch.export's graph calls in their place: an fx trace of a model calls the
# module, a PEFT model traced by torch.export (fx cannot trace it) the function, and the two are compared
_AS_FUNCTION = {"Linear": "linear", "Conv1d": "conv1d", "Conv2d": "conv2d", "Conv3d": "conv3d", "Embedding": "embedding",
                "ReLU": "relu", "GELU": "gelu", "LayerNorm": "layer_norm", "Flatten": "flatten"}


def same_kinds(counts: dict) -> dict:
    """Operator counts under one name per kind, whichever tracer made the graph: a module as its function,
    an ATen overload as its op (``embedding.default`` as ``embedding``), a transpose as a permute."""
    out: dict = {}
    for k, v in counts.items():
        k = _AS_FUNCTION.get(k, k)
        if k.count(".") == 1 and not k.startswith("aten."):  # an ATen overload torch.export left: its op
            k = k.partition(".")[0]
        k = "permute" if k == "transpose" else k
        out[k] = out.get(k, 0) + v
    return out


def ops_over(got: dict, base: dict, ignore=("Constant",)) -> dict[str, tuple[int, int]]:
    """The operator kinds of which ``got`` has more than the base: kind -> (got's count, the base's). One
    exception, in ONNX: a BatchNormalization folded into a bias-less MatMul becomes its Add (LeViT's
    LinearNorm; timm's merge gives the same MatMul + Add), so Adds over the base's count are taken one for
    one against the BatchNormalizations gone."""
    got = dict(got)
    traded = min(max(got.get("Add", 0) - base.get("Add", 0), 0),
                 max(base.get("BatchNormalization", 0) - got.get("BatchNormalization", 0), 0))
    if traded:
        got["Add"] -= traded
    return {k: (v, base.get(k, 0)) for k, v in got.items() if k not in ignore and v > base.get(k, 0)}


def ops_within(got: dict, base: dict, ignore=("Constant",)) -> tuple[bool, str]:
    """Whether every operator count of ``got`` is <= the base's (:func:`ops_over`); the excess when not."""
    over = ops_over(got, base, ignore)
    return not over, ", ".join(f"{k} {b}->{v}" for k, (v, b) in sorted(over.items()))


@contextlib.contextmanager
def quiet():
    """No warnings or exporter chatter."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        levels = {n: logging.getLogger(n).level for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")}
        for n in levels:
            logging.getLogger(n).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for n, lv in levels.items():
                logging.getLogger(n).setLevel(lv)


class Stage(Exception):
    """A failure at a named stage; ``kind`` is the path status it gives."""

    def __init__(self, kind: str, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {_line(cause)}")
        self.kind, self.stage, self.cause = kind, stage, cause


def at(kind: str, stage: str, fn, *a, **kw):
    try:
        return fn(*a, **kw)
    except Exception as e:
        raise Stage(kind, stage, e) from e


# ----------------------------------------------------------------------------------------------- adapters

def _is_attn_mlp(path: str) -> bool:
    last = path.rpartition(".")[2].lower()
    parts = [re.sub(r"\d+$", "", p) for p in last.split("_")]
    if "feed_forward" in last:
        return True
    if "self_attn" in last or "self_attention" in last:
        return not (set(parts) & NOT_ATTN_MLP)
    return bool(set(parts) & ATTN_MLP) and not (set(parts) & NOT_ATTN_MLP)


def _weighted(m) -> int | None:
    """The input width of a Linear / Conv / MultiheadAttention, else None."""
    from torch import nn

    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim
    return None


def choose_scopes(gm0, convs_only: bool = False, within: tuple = ()) -> tuple[list[str], str, list[str]]:
    """(scope paths, "attn/mlp" or "conv", notes) on the traced base graph (with shapes); ``convs_only``: the
    CNN rule even where attention-like scopes exist (YOLO11's one PSA block, RT-DETR's transformer: convs are
    what a YOLO user adapts); ``within``: the CNN rule on the convs under these scope prefixes only (RAFT's
    backbone)."""
    from torch import nn

    from repfold.adapters.insert import _entering, _float_tensor, scopes

    notes = []

    def usable(scope):
        try:
            value, _ = _entering(gm0, scope)
        except ValueError as e:
            return str(e).partition("; ")[0].partition(") receives ")[2] or "not one input"
        meta = _float_tensor(value)
        if meta is None or not 3 <= len(meta.shape) <= 5:
            return f"rank {len(meta.shape) if meta else '?'} input"
        return None

    all_scopes = scopes(gm0)
    hits = [s for s in all_scopes if _is_attn_mlp(s)]
    hits = [s for s in hits if not any(s.startswith(o + ".") for o in hits)]  # outermost only
    hits = [] if convs_only else hits
    chosen = []
    for s in hits:
        why = usable(s)
        (notes.append(f"{s}: {why}") if why else chosen.append(s))
    if hits:
        return chosen, "attn/mlp", notes
    convs = {"1x1": [], "kxk": []}
    for n in gm0.graph.nodes:
        if n.op == "call_module":
            m = gm0.get_submodule(n.target)
            if within and not str(n.target).startswith(within):
                continue
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups == 1 and m.in_channels >= 4:
                kind = "1x1" if all(k == 1 for k in m.kernel_size) else "kxk"
                if n.target not in convs[kind] and usable(n.target) is None:
                    convs[kind].append(n.target)
    for kind, found in convs.items():
        k = min(MAX_CONVS, len(found))
        picks = sorted({round(i * (len(found) - 1) / max(k - 1, 1)) for i in range(k)})
        chosen += [found[i] for i in picks]
    order = {s: i for i, s in enumerate(all_scopes)}
    return sorted(chosen, key=lambda s: order.get(s, 0)), "conv", notes


def axis_check(gm) -> tuple[int, list[str]]:
    """(adapters checked, "wrong axis" lines): each adapter's width against the layer that reads its value.

    From the adapter, follow the value through ops that keep its shape (activations, norms, adds, Identity,
    dropout) to the first Linear / Conv / MultiheadAttention that reads it (else back to the first that
    produced it): that layer reads the channel axis (Linear: last, Conv: 1), so its input (output) width is
    the width the adapter must have. An adapter whose value only meets layers after a reshape is unchecked.
    """
    from repfold.adapters.insert import PREFIX

    placed = gm.meta.get("repfold", {}).get("adapters", {})
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    wrong, checked = [], 0
    for scope, target in placed.items():
        node = nodes.get(target)
        if node is None:
            continue
        adapter = gm.get_submodule(target)
        want, where = _reader(gm, node, PREFIX)
        if want is None:
            continue
        checked += 1
        if adapter.channels != want:
            wrong.append(f"{scope.removesuffix(':after')}: adapter width {adapter.channels}, {where} {want}")
    return checked, wrong


def _shape(n) -> tuple | None:
    meta = n.meta.get("tensor_meta") if hasattr(n, "meta") else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _reader(gm, adapter_node, prefix):
    """(width, what) of the nearest weighted layer that reads (else produced) the adapter's value unchanged."""
    from repfold.frontends.trace import is_shape_read

    value = adapter_node.args[0]
    want_shape = _shape(value)
    if want_shape is None:
        return None, None

    def layer(n):
        if n.op == "call_module" and not str(n.target).startswith(prefix):
            return gm.get_submodule(n.target)
        return None

    seen, frontier = {adapter_node}, list(adapter_node.users)  # forward: who reads it
    while frontier:
        nxt = []
        for n in frontier:
            if n in seen or is_shape_read(n):
                continue
            seen.add(n)
            m = layer(n)
            if m is not None and _weighted(m) is not None:
                return _weighted(m), f"{n.target} reads"
            if _shape(n) == want_shape:
                nxt.extend(n.users)
        frontier = nxt
    seen, frontier = set(), [value]  # backward: who made it
    while frontier:
        nxt = []
        for n in frontier:
            if n in seen or _shape(n) != want_shape:
                continue
            seen.add(n)
            m = layer(n)
            if m is not None and _weighted(m) is not None:
                out = getattr(m, "out_features", None) or getattr(m, "out_channels", None) or getattr(
                    m, "embed_dim", None)
                return out, f"{n.target} writes"
            nxt.extend(a for a in n.all_input_nodes if a.op != "get_attr")
        frontier = nxt
    return None, None


def insert_adapters(model, x, scopes_, kind):
    """repfold.insert as a user would call it; (gm, note)."""
    import repfold

    kw = {}
    note = []
    if kind == "conv" and "bias" in inspect.signature(repfold.insert).parameters:
        kw["bias"] = False
        note.append("bias=False")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            gm = repfold.insert(model, before=scopes_, example_inputs=_args(x), **kw)
        except ValueError as e:
            if "groups=" not in str(e):
                raise
            said.clear()
            gm = repfold.insert(model, before=scopes_, example_inputs=_args(x), groups=1, **kw)
            note.append("groups=1")
    foretold = sum("repfold.insert" in str(w.message) for w in said)
    if foretold:  # insert's own warnings: adapters it already knows will not fold
        note.append(f"insert warned of {foretold}")
    return gm, note


# ----------------------------------------------------------------------------------------------- paths

def _ort(proto, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    s = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds, xs = s.get_inputs(), _args(x)
    if len(feeds) != len(xs):
        raise RuntimeError(f"{len(feeds)} graph inputs for {len(xs)} inputs")
    return s.run(None, {f.name: a.numpy() for f, a in zip(feeds, xs)})


def export(model, x, dynamo: bool, one_arg: bool = False):
    """The ONNX export of ``model`` at ``x``. ``one_arg``: the TorchScript exporter gets the model behind a
    forward of one argument (Hugging Face models: that exporter passes every default argument positionally,
    which transformers' forward refuses beside the keywords it sets itself, "got multiple values for argument
    'use_cache'"; a user wraps the model so)."""
    import onnx
    import torch

    if one_arg and not dynamo:
        class OneArg(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return self.inner(x)

        model = OneArg(model).eval()
    with quiet():
        if dynamo:
            return torch.onnx.export(model, _args(x), dynamo=True, verbose=False).model_proto
        buf = io.BytesIO()
        torch.onnx.export(model, _args(x), buf, dynamo=False, opset_version=17)
        return onnx.load_from_string(buf.getvalue())


def _regions(report, res: dict) -> None:
    res["folded"] = len(report.folded)
    res["kept"] = len(report.kept)
    reasons: dict[str, int] = {}
    for r in report.kept:
        reasons[short(r.reason)] = reasons.get(short(r.reason), 0) + 1
    res["kept_reasons"] = reasons
    res["kept_examples"] = list({short(r.reason): r.reason for r in report.kept}.values())[:3]
    # a region folded into one of the adapters' own layers leaves that layer running: never a fold
    res["into_adapter"] = [r.line() for r in report.folded if any("repfold_adapters" in i for i in r.into)][:3]


def _noop(report, y0, y, res: dict) -> None:
    """What the fold of the model without adapters changed (it should change nothing): ``y0`` its outputs,
    ``y`` the model's."""
    res["noop_bitwise"] = bitwise(y0, y)
    if not res["noop_bitwise"]:
        res["noop_err"] = rel_err(y0, y)
    if report.folded:
        res["noop_folded"] = [r.line() for r in report.folded][:3]
        # the model's own BatchNorm / LayerScale / constants fold by default (scale regions), and so do
        # parallel branches summed into one conv (RepVGG's train form): a problem is only a region with
        # layers folded in a model without adapters that does not lower the operator count
        before, after = report.ops_before, report.ops_after
        kinds = set(before) | set(after)
        raised = ops_over(after, before, ignore=())
        lowered = not raised and sum(after.values()) < sum(before.values())
        layered = [r.line() for r in report.folded if not r.scale]
        res["noop_layered"] = [] if lowered else layered[:3]
        res["noop_merged"] = len(layered) if lowered else 0
        res["noop_scales"] = sum(r.scale for r in report.folded)
        res["noop_ops"] = {k: f"{before.get(k, 0)}->{after.get(k, 0)}"
                           for k in kinds if before.get(k, 0) != after.get(k, 0)}
        # a fold of the model's own scales or branches must never add an operator of any kind
        res["noop_raised"] = {k: f"{b}->{v}" for k, (v, b) in raised.items()}


def _effect(res: dict, ya: list, y: list) -> None:
    """How much the adapters move the eager model's output (the same on every path)."""
    res["effect"] = rel_err(ya, y)
    res["changed"] = res["effect"] > EFFECT


def _fold_checked(adapted, ya_art, truth, run_stage: str, run, res: dict, **fold_kw):
    """Fold ``adapted`` (the artifact with adapters: the module, ONNX file or program, whose outputs are
    ``ya_art``) and record into ``res`` the fold time, its regions, the fold's own error (the folded artifact
    against ``adapted``: ``max_err``) and the end-to-end error (the folded artifact against ``truth``, the eager
    model with adapters: ``e2e_err``); ``run(folded)`` gives the folded artifact's outputs. The fold and report."""
    import repfold

    t = time.perf_counter()
    folded, report = at("crash", "fold", repfold.fold, adapted, return_report=True, **fold_kw)
    res["fold_s"] = time.perf_counter() - t
    _regions(report, res)
    got = at("crash", run_stage, run, folded)
    res["max_err"] = rel_err(got, ya_art)
    res["e2e_err"] = rel_err(got, truth)
    res["new_bias"] = sum(getattr(r, "new_bias", 0) for r in report.regions)
    return folded, report


def _vs_base(res: dict, report, got: dict, base: dict, adapted: dict, params_delta, ignore=()) -> None:
    """Operators of the folded artifact (``got``) against the base's (``base``) when every region folded,
    else against the artifact with adapters (``adapted``); parameters against the base's when every region
    folded (``params_delta``: a callable giving the difference)."""
    ref = base if not report.kept else adapted
    res["ops_ok"], res["ops_over"] = ops_within(got, ref, ignore)
    res["ops_vs"] = "base" if not report.kept else "with adapters"
    res["ops_n"] = sum(v for k, v in got.items() if k not in ignore)
    res["base_ops_n"] = sum(v for k, v in ref.items() if k not in ignore)
    if not report.kept:  # fewer is fine: a constant scale of the model's own may fold too (README)
        res["params_delta"] = params_delta()
        _params_ok(report, res)


def _vs_reference(res: dict, report, got: dict, params: int, ref, noop: tuple, ignore=()) -> None:
    """Operators and parameters of the folded artifact against the ecosystem's own merge, made the same way
    (``ref``: None, or (name, whether it holds the adapters, a callable giving its (operator counts, stored
    values))). A reference without the adapters (timm's ``reparameterize_model`` of the base) stands for the
    folded model only when every region folded (a kept adapter runs, and says why, in the report); else it is
    compared with the fold of the base (``noop``: its (operator counts, stored values)), ``ref_of`` says
    which."""
    if ref is None:
        return
    name, covers_adapters, counts = ref
    res["ref"] = name
    new_bias = res.get("new_bias", 0)
    if report.kept and not covers_adapters:
        (got, params), new_bias, res["ref_of"] = noop, 0, "the fold without adapters"
    try:
        ref_ops, ref_params = counts()
    except Exception as e:  # noqa: BLE001 (the ecosystem's own merge failing to trace or export is noted)
        res["ref_error"] = _line(e)
        return
    res["ref_ops_ok"], res["ref_over"] = ops_within(got, ref_ops, ignore)
    res["ref_ops_n"] = sum(v for k, v in ref_ops.items() if k not in ignore)
    res["ref_got_n"] = sum(v for k, v in got.items() if k not in ignore)
    res["ref_params_delta"] = params - ref_params
    res["ref_params_ok"] = res["ref_params_delta"] <= new_bias


@contextlib.contextmanager
def no_mha_fastpath():
    """README: a frozen nn.MultiheadAttention's fused inference path does not export."""
    import torch

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def path_fx(model, x, y, gm, ya, ref=None, eager=None) -> dict:
    """fx: (a) noop fold bitwise, (b) fold of ``gm`` (adapters in; eager outputs ``ya``) exact against the eager
    model and no more operators than the base (and the reference merge ``ref``); time.

    ``gm`` is what ``insert`` made (a GraphModule, folded to one), or the user's model with adapters of its own
    (a PEFT model): that folds into its own class, the default, whose operators are counted as fold traces
    it, against the base (``eager``, the eager base model, where ``model`` is a graph standing for it)
    folded the same way (a model's own scale in its forward code, such as Llama's RMSNorm weight, stays in
    both)."""
    import torch
    from torch import fx

    import repfold
    from repfold.frontends.fx import op_counts

    res: dict = {}
    own_class = gm is not None and not isinstance(gm, fx.GraphModule)
    if own_class and eager is not None:  # the base of a class result: the eager base model, folded into its class
        model = eager
    base, rep0 = at("crash", "fold without adapters", repfold.fold, model, example_inputs=_args(x), return_report=True,
                    graph=not own_class)

    def counts(m):  # a GraphModule's operators, or those of a module of the user's class as fold traces it
        if isinstance(m, fx.GraphModule):
            return same_kinds(op_counts(m))
        return same_kinds(repfold.fold(m, example_inputs=_args(x), graph=True, return_report=True)[1].ops_before)

    with torch.no_grad():
        _noop(rep0, at("crash", "run folded base", lambda: flat(base(*_args(x)))), y, res)
    if gm is None:
        return res
    _effect(res, ya, y)
    kw = {} if isinstance(gm, fx.GraphModule) else {"example_inputs": _args(x)}  # a PEFT model: inputs given
    # the artifact with adapters is the eager model itself: the fold's error is the end-to-end error
    try:
        folded, report = _fold_checked(gm, ya, ya, "run folded", torch.no_grad()(lambda f: flat(f(*_args(x)))), res,
                                       **kw)
    except Stage as e:  # neither torch.fx nor torch.export traces the model with adapters (a PEFT model): torch's
        if type(e.cause).__name__ == "TraceError" and "torch.export failed too" in str(e.cause):
            raise Stage("export failed", "trace with adapters (torch.fx, then torch.export)", e.cause) from e
        raise
    got = counts(folded)
    _vs_base(res, report, got, counts(base), same_kinds(report.ops_before),
             lambda: _stored(folded) - _stored(model))

    def ref_counts():  # the reference traced as fold traces a module (torch.export where fx fails)
        _, rep = repfold.fold(ref[1], example_inputs=_args(x), return_report=True)
        return same_kinds(rep.ops_before), _stored(ref[1])

    _vs_reference(res, report, got, _stored(folded), ref and (ref[0], ref[2], ref_counts),
                  (counts(base), _stored(base)), ignore=FX_SHAPE_OPS)
    return res


def path_onnx(model, x, y, gm, ya, dynamo: bool, ref=None, one_arg: bool = False) -> dict:
    """An ONNX exporter: the base's export (its faithfulness to eager ``y``: ``base_export_err``), the noop
    fold bitwise; the export of ``gm`` (its faithfulness to eager ``ya``: ``export_err``), its fold exact against
    the export (``max_err``) and the eager model (``e2e_err``), and its cost against the base's and the
    reference merge's exports."""
    import repfold
    from repfold.frontends.onnx import n_params, op_counts

    res: dict = {}
    base = at("not traceable", "export", export, model, x, dynamo, one_arg)
    yb = at("not traceable", "onnxruntime on the export", _ort, base, x)
    res["base_export_err"] = rel_err(yb, y)
    folded0, rep0 = at("crash", "fold without adapters", repfold.fold, base, return_report=True)
    _noop(rep0, at("crash", "onnxruntime on the folded base", _ort, folded0, x), yb, res)
    if gm is None:
        return res
    _effect(res, ya, y)
    with no_mha_fastpath():
        adapted = at("export failed", "export with adapters", export, gm, x, dynamo, one_arg)
    yo = at("export failed", "onnxruntime on the export with adapters", _ort, adapted, x)
    res["export_err"] = rel_err(yo, ya)
    folded, report = _fold_checked(adapted, yo, ya, "onnxruntime on the folded model", lambda f: _ort(f, x), res)
    got = op_counts(folded)
    _vs_base(res, report, got, op_counts(base), op_counts(adapted),
             lambda: n_params(folded) - n_params(base), ignore=("Constant",))

    def ref_counts():
        proto = export(ref[1], x, dynamo, one_arg)
        return op_counts(proto), n_params(proto)

    _vs_reference(res, report, got, n_params(folded), ref and (ref[0], ref[2], ref_counts),
                  (op_counts(folded0), n_params(folded0)), ignore=("Constant",))
    return res


def export_program(model, x):
    """``torch.export.export(model, (x,))`` as a user calls it (non-strict), eval mode, quietly."""
    import torch

    with quiet(), no_mha_fastpath():
        return torch.export.export(model, _args(x), strict=False)


def aten_counts(ep) -> dict[str, int]:
    """An ExportedProgram's operators: its call_function targets (ATen ops, getitem), by operator (not
    overload: ``conv2d.padding`` and ``conv2d.default`` are one), an in-place op as its out-of-place twin (the
    base's ``out += identity`` is ``add_``; a program re-exported from the folded graph may write ``add``),
    a transpose as a permute (PVT's ``x.permute(0, 2, 1)`` before its reduction conv, replayed on the source
    as the adapter's own ``transpose(1, -1)``: one view op for another)."""
    import torch

    counts: dict[str, int] = {}

    def walk(gm) -> None:
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            if isinstance(n.target, torch._ops.HigherOrderOperator):  # (``with torch.no_grad():`` in the model:
                # ``wrap_with_set_grad_enabled`` and a submodule, which a program re-exported after a fold may
                # have inlined): the ops of its submodules, not the wrapper
                for a in n.args:
                    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                        walk(getattr(gm, a.target))
                continue
            op = getattr(n.target, "overloadpacket", None)  # aten.conv2d.padding and .default: one operator
            k = str(op) if op is not None else str(getattr(n.target, "__name__", n.target))
            k = re.sub(r"(?<=[a-z0-9])_$", "", k)  # aten.add_ -> aten.add
            k = "aten.permute" if k == "aten.transpose" else k  # one view op: a fold may copy either
            counts[k] = counts.get(k, 0) + 1

    walk(ep.graph_module)
    return counts


def path_export(model, x, y, gm, ya, ref=None) -> dict:
    """torch.export: the base's program (faithfulness to eager: ``base_export_err``), its noop fold bitwise;
    ``torch.export.export(gm)`` (``export_err`` against eager ``ya``) folded by ``repfold.fold(ep)``, the folded
    program's ``module()`` against the program (``max_err``) and against eager (``e2e_err``); its ATen operators
    against the base's program (and the reference merge's)."""
    import torch

    import repfold

    def run(ep):
        with torch.no_grad():
            return flat(ep.module()(*_args(x)))

    res: dict = {}
    base = at("not traceable", "torch.export", export_program, model, x)
    yb = at("not traceable", "run the exported program", run, base)
    res["base_export_err"] = rel_err(yb, y)
    folded0, rep0 = at("crash", "fold without adapters", repfold.fold, base, return_report=True)
    _noop(rep0, at("crash", "run the folded base program", run, folded0), yb, res)
    if gm is None:
        return res
    _effect(res, ya, y)
    adapted = at("export failed", "torch.export with adapters", export_program, gm, x)
    ye = at("export failed", "run the program with adapters", run, adapted)
    res["export_err"] = rel_err(ye, ya)
    folded, report = _fold_checked(adapted, ye, ya, "run the folded program", run, res)
    got = aten_counts(folded)
    _vs_base(res, report, got, aten_counts(base), aten_counts(adapted),
             lambda: _stored(folded.module()) - _stored(base.module()))

    def ref_counts():
        ep = export_program(ref[1], x)
        return aten_counts(ep), _stored(ep.module())

    _vs_reference(res, report, got, _stored(folded.module()), ref and (ref[0], ref[2], ref_counts),
                  (aten_counts(folded0), _stored(folded0.module())))
    return res


def _stored(model) -> int:
    """The float values a module stores: its parameters and its float buffers (EVA-02's run-time qkv bias
    concatenates a zero buffer between two parameters; the fold stores the whole as one parameter, no value
    more), like ONNX's initializers, which hold both; not the constants torch.fx's trace stored (EVA-02's
    rotary tables, computed from buffers the model holds)."""
    return sum(t.numel() for n, t in (*model.named_parameters(), *model.named_buffers())
               if t.is_floating_point() and not n.rpartition(".")[2].startswith("_tensor_constant"))


def _params_ok(report, res: dict) -> None:
    """No more parameters than the base, but the biases that bias-less layers took to hold an adapter's
    constant (README: no operator more, and the report says so)."""
    res["new_bias"] = sum(getattr(r, "new_bias", 0) for r in report.regions)
    res["params_ok"] = res["params_delta"] <= res["new_bias"]


def tolerance(res: dict) -> float:
    """TOL, or NOISE_MARGIN times the model's own float32 rounding (its output in float32 against float64)
    where that is larger: Swin-V2's cosine attention scales logits by up to 100 and amplifies every rounding,
    so its float32 outputs move by ~3e-6 from any reordering of the arithmetic, folded or not."""
    return max(TOL, NOISE_MARGIN * (res.get("f32_noise") or 0.0))


def det_tolerance(res: dict) -> float:
    """A detector's boxes (``run_detection``) against ``tolerance``, or ``NOISE_MARGIN`` times the detector's
    own float32 rounding (``det_noise``: inf where float64 gives other boxes, and then they judge nothing)."""
    return max(tolerance(res), NOISE_MARGIN * (res.get("det_noise") or 0.0))


def judge(res: dict) -> str:
    """A finished path's status from its checks, the worst first: ``wrong`` (the noop fold changed the
    outputs; or the fold's own error, folded against the unfolded artifact, is over tolerance; or the deployed
    artifact is off the eager model with adapters while the exporter is faithful), ``unfaithful export`` (the
    exporter's own error, the unfolded export against eager, is over tolerance: the user's file is off, and
    not by repfold), ``over reference`` (more operators or parameters than the ecosystem's own merge), ``over
    base`` (more than the base model), ``no adapters``, ``ok``."""
    # Without adapters the outputs must be bitwise the same, unless the fold found something of the
    # model's own to fold (two heads summed: LeViT's distillation head) and said so; then within TOL.
    tol = tolerance(res)
    if res.get("noop_bitwise") is False and (not res.get("noop_folded") or res.get("noop_err", 0) > tol):
        return "wrong"
    if res.get("max_err", 0) > tol:
        return "wrong"
    if res.get("export_err", 0) > tol:
        return "unfaithful export"
    if res.get("e2e_err", 0) > tol or res.get("det_err", 0) > det_tolerance(res):
        return "wrong"
    if res.get("ref_ops_ok") is False or res.get("ref_params_ok") is False:
        return "over reference"
    if res.get("ops_ok") is False or res.get("params_ok") is False:
        return "over base"
    if "max_err" not in res and res.get("noop_bitwise") is not None and res.get("adapters") == 0:
        return "no adapters"
    return "ok"


# ----------------------------------------------------------------------------------------------- one model

def hf_lora(model) -> tuple:
    """PEFT LoRA (rank ``LORA_RANK``) on every Linear of the model's repeated blocks, by its last name, with
    random non-zero A and B (as if trained: PEFT starts B at zero); (the PEFT model in eval mode, the target
    names, the LoRA layer count, ``merge_and_unload``'s model)."""
    import peft
    from torch import nn

    names = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                    if isinstance(m, nn.Linear) and re.search(r"\.\d+\.", n)})
    config = peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=names, lora_dropout=0.0)
    adapted = peft.get_peft_model(copy.deepcopy(model), config)
    layers = _trained_lora(adapted)
    return adapted, names, layers, copy.deepcopy(adapted).merge_and_unload().eval()


def _trained_lora(adapted) -> int:
    """Give the LoRA weights of ``adapted`` random non-zero values (as after training: PEFT starts B at zero)
    and put it in eval mode; the number of its LoRA layers."""
    import peft
    import torch

    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    adapted.eval()
    return sum(1 for m in adapted.modules() if isinstance(m, peft.tuners.lora.LoraLayer))


def peft_adapted(model, kind: str, x) -> tuple:
    """PEFT's ``kind`` (``peft_configs``) on the toy model, as ``benchmarks/peft_matrix.py`` makes it (``adapt``:
    every adapter weight moved by N(0, 0.1), as if trained), targeting every module of ``PEFT_KINDS`` that the
    type takes: each is tried alone first (PEFT wraps it, the model runs, ``merge_and_unload`` of a copy runs);
    (the PEFT model in eval mode, the targets, the number of PEFT layers, ``merge_and_unload``'s model, {target:
    why PEFT cannot take it})."""
    import peft
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft_matrix import adapt  # (importable: peft_configs put this folder on the path)

    make = peft_configs()[kind][0]
    cannot = {}
    for name in PEFT_KINDS:
        try:
            one = adapt(peft, model, make([name]))
            with torch.no_grad():
                want = one(*_args(x))
                err = float((copy.deepcopy(one).merge_and_unload().eval()(*_args(x)) - want).abs().max())
        except Exception as e:  # noqa: BLE001 (PEFT refusing a kind is the answer)
            cannot[name] = _line(e, 120)
            continue
        if err > TOL:  # a merge that changes the outputs is no reference to weigh a fold's cost against (OFT on
            # a kxk conv rotates overlapping patches of its input, summed back: no weight of the conv holds that)
            cannot[name] = f"merge_and_unload changes the outputs (max error {err:.2g})"
    targets = [n for n in PEFT_KINDS if n not in cannot]
    if not targets:
        raise RuntimeError("PEFT takes none of the toy's target kinds: " + "; ".join(cannot.values()))
    adapted = adapt(peft, model, make(targets))
    layers = sum(1 for m in adapted.modules() if isinstance(m, BaseTunerLayer))
    return adapted, targets, layers, copy.deepcopy(adapted).merge_and_unload().eval(), cannot


def diffusers_lora(model, family: str) -> tuple:
    """PEFT LoRA (rank ``LORA_RANK``) on the diffusers model's ``DIFFUSERS`` targets through its own
    ``add_adapter``, random non-zero A and B; (the model with LoRA in eval mode, the targets, the LoRA layer count,
    diffusers' own merge: ``fuse_lora()`` then ``unload_lora()`` of a copy)."""
    import peft

    targets = DIFFUSERS[family][2]
    adapted = copy.deepcopy(model)
    adapted.inner.add_adapter(peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=targets,
                                              lora_dropout=0.0))
    layers = _trained_lora(adapted)
    merged = copy.deepcopy(adapted)
    merged.inner.fuse_lora()
    merged.inner.unload_lora()
    return adapted, targets, layers, merged.eval()


def ultralytics_reference(model):
    """Ultralytics' own merge: ``fuse()`` of a copy of the base (BatchNorms into convs, RepConv / RepVGGDW
    branches summed)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return copy.deepcopy(model).fuse(verbose=False).eval()


def timm_reference(model):
    """timm's own merge (``reparameterize_model``: ``fuse()`` / ``reparameterize()`` / ``switch_to_deploy()`` of
    each module that has one), or None for a model with none of those."""
    if not any(hasattr(m, a) for m in model.modules() if m is not model
               for a in ("fuse", "reparameterize", "switch_to_deploy")):
        return None
    from timm.utils.model import reparameterize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reparameterize_model(model).eval()


def run_model(model_id: str, paths=PATHS, progress=None) -> dict:
    """One row of the zoo: everything about ``model_id``; never raises (a crash is in the row)."""
    import torch

    source = model_id.partition(":")[0]
    if source in ("timm", "torchvision"):
        entry = {"id": model_id, "source": source, "family": _family(model_id)}
    elif source == "hf":
        entry = hf_entry(model_id)
    else:
        entry = resolve(model_id, [])
    if entry["family"] == "detection":
        return run_detection(entry, paths, progress)
    row = {"id": entry["id"], "source": entry["source"], "family": entry["family"], "paths": {}}
    if entry.get("variant"):
        row["variant"] = entry["variant"]
    if entry.get("peft_type"):
        row["peft_type"] = entry["peft_type"]
    t_model = time.perf_counter()

    def save():
        row["time_s"] = round(time.perf_counter() - t_model, 2)
        if progress:
            progress(row)

    if entry["id"] in EXCLUDED:
        row["excluded"] = EXCLUDED[entry["id"]]
        return row
    nbytes = weight_bytes(entry)
    row["weight_mb"] = round(nbytes / 2**20, 1) if nbytes is not None else None
    if nbytes is not None and nbytes > MAX_WEIGHT_BYTES:
        row["excluded"] = f"{EXCLUDE_RULES['weights']}: {nbytes / 2**30:.2f} GB"
        return row
    try:
        model, x, row["input"] = build(entry)
    except Exception as e:  # noqa: BLE001 (a model timm or torchvision cannot build is a row, not a stop)
        row["build_error"] = _line(e)
        save()
        return row
    if entry["source"] == "hf" and model.config.return_dict:
        row["build_note"] = "return_dict=True (False fails)"
    with torch.no_grad():
        y = flat(model(*_args(x)))
    # the model's own float32 rounding: its outputs against the same model in float64 (a model judged in float64
    # has none to measure: TOL alone)
    with contextlib.suppress(Exception):  # a model that does not run in float64: TOL alone
        if entry["id"] not in FLOAT64:
            with torch.no_grad():
                y64 = flat(copy.deepcopy(model).double()(*(a.double() if a.is_floating_point() else a
                                                           for a in _args(x))))
            row["f32_noise"] = rel_err(y, y64)
    save()

    # The traced base graph: the scopes to choose from, and whether torch.fx can trace the model at all.
    from repfold.frontends.trace import shape, to_graph_module

    gm, gm0, ya, ref = None, None, None, None
    try:
        with quiet():
            gm0 = to_graph_module(model)
            shape(gm0, _args(x))
        row["traced"] = "fx"
    except Exception as e:  # noqa: BLE001 (untraceable is a result)
        row["trace_error"] = _line(e)
        try:  # as repfold.insert does: torch.export where torch.fx fails
            with quiet():
                gm0 = to_graph_module(torch.export.export(model, _args(x), strict=False).module())
                shape(gm0, _args(x))
            row["traced"] = "torch.export"
        except Exception as e2:  # noqa: BLE001 (untraceable by both is a result)
            gm0 = None
            row["traced"] = "failed"
            row["trace_error"] += f"; torch.export: {_line(e2)}"
    if entry["source"] == "peft":  # a PEFT type on the toy model, PEFT's merge_and_unload as the reference
        try:
            with quiet():
                gm, names, n, merged, cannot = peft_adapted(model, entry["peft_type"], x)
            row.update(scope_kind=entry["peft_type"], adapters=n, peft_targets=[PEFT_KINDS[t] for t in names],
                       peft_cannot={PEFT_KINDS[t]: why for t, why in cannot.items()})
            ref = ("merge_and_unload", merged, True)
        except Exception as e:  # noqa: BLE001 (PEFT failing on the model is a result, not a repfold crash)
            row["adapter_error"] = _line(e)
    elif entry.get("variant") == "lora":  # PEFT's adapters, PEFT's (or diffusers') merge as the reference
        try:
            with quiet():
                gm, names, n, merged = (diffusers_lora(model, entry["family"]) if entry["source"] == "diffusers"
                                         else hf_lora(model))
            row.update(scope_kind="lora", adapters=n, lora_targets=names)
            ref = ("fuse_lora+unload_lora" if entry["source"] == "diffusers" else "merge_and_unload", merged, True)
        except Exception as e:  # noqa: BLE001 (PEFT failing on the model is a result, not a repfold crash)
            row["adapter_error"] = _line(e)
    elif gm0 is not None:
        try:
            flow = entry["family"] == "optical_flow"
            chosen, kind, notes = choose_scopes(gm0, convs_only=entry["source"] == "ultralytics" or flow,
                                                within=TV_FLOW_BACKBONE if flow else ())
            if entry["family"] in HF_BEFORE and entry["source"] == "hf":
                chosen, kind = HF_BEFORE[entry["family"]], "named"
            row.update(scope_kind=kind, adapters=len(chosen), scope_notes=notes[:5], scopes=chosen)
            if chosen:
                with quiet():
                    gm, note = insert_adapters(model, x, chosen, kind)
                randomize_adapters(gm)
                gm.eval()
                row["adapters"] = len(gm.meta.get("repfold", {}).get("adapters", chosen))
                row["insert_note"] = note
                row["axis_checked"], row["wrong_axis"] = axis_check(gm)
        except Exception as e:  # noqa: BLE001 (an insert that fails is a result)
            gm = None
            row["insert_error"] = _line(e)
            row["insert_trace"] = traceback.format_exc(limit=-3)[-800:]
    if gm is not None:  # the user's truth: the eager model with adapters
        try:
            with torch.no_grad():
                ya = flat(gm(*_args(x)))
        except Exception as e:  # noqa: BLE001 (the model insert returned does not run)
            gm = None
            row["insert_error"] = f"the model with adapters does not run: {_line(e)}"
    if entry["source"] == "ultralytics" and gm is not None:
        try:
            ref = ("fuse", ultralytics_reference(model), False)
        except Exception as e:  # noqa: BLE001 (the ecosystem's own merge failing is noted)
            row["ref_error"] = _line(e)
    if entry["source"] == "timm" and gm is not None:
        try:
            made = timm_reference(model)
            if made is not None:
                ref = ("reparameterize_model", made, False)
        except Exception as e:  # noqa: BLE001 (timm's own merge failing is noted)
            row["ref_error"] = _line(e)
    if ref is not None:
        row["reference"] = ref[0]
        try:  # the reference merge's own faithfulness, for the record
            with torch.no_grad():
                row["ref_err"] = rel_err(flat(ref[1](*_args(x))), ya if ref[2] else y)
        except Exception as e:  # noqa: BLE001
            row["ref_error"] = _line(e)
    save()

    for p in paths:
        t = time.perf_counter()
        try:
            if p == "fx":
                if gm0 is None:
                    res = {"status": "not traceable", "error": row["trace_error"], "stage": "trace"}
                else:
                    source = model if row["traced"] == "fx" else gm0
                    fx_ref = ref
                    if gm is not None and getattr(gm, "meta", {}).get("repfold", {}).get("trace") == "torch.export":
                        row["insert_traced_by"] = "torch.export"
                        if source is model:  # insert traced by torch.export: the same graph stands for the model
                            with quiet():
                                source = to_graph_module(torch.export.export(model, _args(x), strict=False).module())
                    if source is model and entry["source"] == "peft" and not fx_traces(gm):
                        # fold traces PEFT's model by torch.export (torch.fx cannot): the base and the reference
                        # merge by torch.export too, so that the operators counted are of one kind (ATen)
                        row["insert_traced_by"] = "torch.export"
                        with quiet():
                            source = to_graph_module(torch.export.export(model, _args(x), strict=False).module())
                            fx_ref = (ref[0], to_graph_module(torch.export.export(
                                ref[1], _args(x), strict=False).module()), ref[2]) if ref else None
                    with quiet():  # an untraceable model: its exported graph stands for it (same ops as gm's)
                        res = path_fx(source, x, y, gm, ya, fx_ref, eager=model)
            elif p == "export":
                with quiet():
                    res = path_export(model, x, y, gm, ya, ref)
            elif entry["id"] in FLOAT64:
                res = {"status": "not traceable", "stage": "onnxruntime", "error": FLOAT64_ONNX}
            else:
                with quiet():
                    res = path_onnx(model, x, y, gm, ya, p == "dynamo", ref, one_arg=entry["source"] == "hf")
            res["adapters"] = row.get("adapters", 0) if gm is not None else 0
            res["f32_noise"] = row.get("f32_noise")
            res.setdefault("status", judge(res))
            if gm is None and "insert_error" in row:
                res["status"], res["stage"], res["error"] = "crash", "insert", row["insert_error"]
            elif gm is None and "adapter_error" in row:  # PEFT itself fails on the model: not repfold's
                res["status"], res["stage"], res["error"] = "not traceable", "peft", row["adapter_error"]
        except Exception as e:  # noqa: BLE001 (a Stage, or a bug of this harness or of torch running a model)
            res = _failure(e)
        _path_done(row, p, res, t, save)
    return row


def fx_traces(model) -> bool:
    """Whether torch.fx traces ``model`` (a PEFT model: its forward hooks and keyword plumbing often stop it)."""
    from torch import fx

    try:
        with quiet():
            fx.symbolic_trace(model)
        return True
    except Exception:  # noqa: BLE001 (any failure: not traceable by fx)
        return False


def run_detection(entry: dict, paths=PATHS, progress=None) -> dict:
    """A torchvision detector's row: adapters into its backbone (``repfold.insert(model.backbone, ...)``), the
    backbone folded (fx: ``repfold.fold(gm)``; export: ``repfold.fold(torch.export.export(gm))``) and put back;
    judged on the backbone's features (``path_fx`` / ``path_export`` of the backbone) and on the detector's
    outputs with the folded backbone against the detector with the adapted one (``det_err``, where it
    detects anything). Only ``DETECTION_PATHS``: the detector runs in PyTorch (``WHOLE_DETECTOR``)."""
    import torch
    import torchvision.models as tvm

    import repfold
    from repfold.frontends.trace import shape, to_graph_module

    name = entry["id"].partition(":")[2]
    row = {"id": entry["id"], "source": "torchvision", "family": "detection", "paths": {},
           "whole_model": WHOLE_DETECTOR}
    t_model = time.perf_counter()

    def save():
        row["time_s"] = round(time.perf_counter() - t_model, 2)
        if progress:
            progress(row)

    seen = {}
    try:
        kw = {"weights": None, "weights_backbone": None}
        if not name.startswith("ssd"):
            kw.update(min_size=TV_DETECTION_SIZE, max_size=TV_DETECTION_SIZE)
        # a score threshold under random weights' scores (~1 / classes), so that the detector's boxes are compared
        kw["box_score_thresh" if "rcnn" in name else "score_thresh"] = DETECTION_SCORE
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tvm.get_model(name, **kw).eval()
        randomize(model)
        img = torch.rand(3, TV_DETECTION_SIZE, TV_DETECTION_SIZE, generator=torch.Generator().manual_seed(1))
        hook = model.backbone.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        with torch.no_grad():
            det = model([img])
        hook.remove()
        xb = seen["x"]
        with torch.no_grad():
            y = flat(model.backbone(xb))
    except Exception as e:  # noqa: BLE001 (a model torchvision cannot build is a row)
        row["build_error"] = _line(e)
        save()
        return row
    row["input"] = f"image 3x{TV_DETECTION_SIZE}x{TV_DETECTION_SIZE}, backbone " + "x".join(map(str, xb.shape))
    row["detections"] = int(det[0]["boxes"].shape[0])
    with torch.no_grad():
        row["f32_noise"] = rel_err(y, flat(copy.deepcopy(model.backbone).double()(xb.double())))
    try:  # torch.fx's own answer on the whole detector, for the record
        with quiet():
            torch.fx.symbolic_trace(model)
        row["whole_fx"] = "traced"
    except Exception as e:  # noqa: BLE001
        row["whole_fx"] = _line(e)
    save()
    try:
        with quiet():
            gm0 = to_graph_module(model.backbone)
            shape(gm0, (xb,))
        row["traced"] = "fx (backbone)"
        chosen, kind, notes = choose_scopes(gm0)
        row.update(scope_kind=kind, adapters=len(chosen), scope_notes=notes[:5])
        with quiet():
            gm, note = insert_adapters(model.backbone, xb, chosen, kind)
        randomize_adapters(gm)
        gm.eval()
        row["adapters"] = len(gm.meta.get("repfold", {}).get("adapters", chosen))
        row["insert_note"] = note
        row["axis_checked"], row["wrong_axis"] = axis_check(gm)
        with torch.no_grad():
            ya = flat(gm(xb))
        adapted = copy.deepcopy(model)
        adapted.backbone = gm
        with torch.no_grad():
            det_a = adapted([img])
            # the detector's own float32 rounding (against float64): top-k and NMS over the near-tied scores of
            # random weights may turn it into other boxes (SSDlite), then its boxes cannot judge a fold
            row["det_noise"] = rel_err(flat(det_a), flat(copy.deepcopy(adapted).double()([img.double()])))
    except Exception as e:  # noqa: BLE001 (an insert that fails is a result)
        row["insert_error"] = _line(e)
        row["insert_trace"] = traceback.format_exc(limit=-3)[-800:]
        save()
        return row
    save()

    def detector(backbone):  # the detector's outputs with ``backbone`` in place of the adapted one
        adapted.backbone = backbone
        try:
            with torch.no_grad():
                return adapted([img])
        finally:
            adapted.backbone = gm

    for p in paths:
        if p not in DETECTION_PATHS:
            continue
        t = time.perf_counter()
        try:
            with quiet():
                if p == "fx":
                    res = path_fx(model.backbone, xb, y, gm, ya)
                    folded = at("crash", "fold", repfold.fold, gm)
                else:
                    res = path_export(model.backbone, xb, y, gm, ya)
                    folded = at("crash", "fold", repfold.fold, export_program(gm, xb)).module()
                got = at("crash", "the detector with the folded backbone", detector, folded)
            res["detections"] = int(det_a[0]["boxes"].shape[0])
            res["det_err"] = rel_err(flat(got), flat(det_a))
            if res["det_err"] == math.inf:
                res["det_note"] = ", ".join(f"{k} {tuple(v.shape)} vs {tuple(det_a[0][k].shape)}"
                                            for k, v in got[0].items())
            res["adapters"] = row["adapters"]
            res["f32_noise"], res["det_noise"] = row.get("f32_noise"), row["det_noise"]
            res.setdefault("status", judge(res))
        except Exception as e:  # noqa: BLE001 (a Stage, or a bug of this harness or of torch running a model)
            res = _failure(e)
        _path_done(row, p, res, t, save)
    return row


def _path_done(row: dict, path: str, res: dict, t: float, save) -> None:
    """Path ``path``'s result ``res`` (begun at ``t``) into ``row``, saved."""
    res["time_s"] = round(time.perf_counter() - t, 2)
    row["paths"][path] = res
    save()


def _failure(e: Exception) -> dict:
    """A path's result for what it raised: a ``Stage`` names its kind and stage; anything else is a crash of
    the harness (or of torch while running a model)."""
    if isinstance(e, Stage):
        res = {"status": e.kind, "stage": e.stage, "error": _line(e.cause)}
        if e.kind == "crash":
            res["trace"] = "".join(traceback.format_exception(e.cause, limit=-4))[-1200:]
        return res
    return {"status": "crash", "stage": "harness", "error": _line(e),
            "trace": "".join(traceback.format_exception(e, limit=-4))[-1200:]}


def _family(model_id: str) -> str:
    source, _, bare = model_id.partition(":")
    if source == "timm":
        import timm

        for module in timm.list_modules():
            if bare in timm.list_models(module=module):
                return module
        return "?"
    if bare in TV_DETECTION:
        return "detection"
    if bare in TV_FLOW:
        return "optical_flow"
    for kind, n in torchvision_models():
        if n == bare:
            return kind
    return "?"


# ----------------------------------------------------------------------------------------------- problems

def problems(row: dict) -> list[str]:
    """What is wrong in a row, one short line each (empty: nothing)."""
    out = []
    if row.get("build_error"):
        out.append(f"build: {row['build_error']}")
    if row.get("timeout"):
        out.append(f"timeout after {row['timeout']} s")
    if row.get("died"):
        out.append(f"process died: {row['died']}")
    if row.get("insert_error"):
        out.append(f"insert crash: {row['insert_error']}")
    for w in row.get("wrong_axis") or []:
        out.append(f"wrong axis: {w}")
    for p, r in row.get("paths", {}).items():
        st = r.get("status")
        if st in ("crash", "not traceable", "export failed") and not (st == "crash" and r.get("stage") == "insert"):
            out.append(f"{p} {st} at {r.get('stage')}: {r.get('error')}")
        tol = tolerance(r)
        if r.get("noop_bitwise") is False and (not r.get("noop_folded") or r.get("noop_err", 1.0) > tol):
            out.append(f"{p} noop fold not bitwise (err {r.get('noop_err', float('nan')):.1e})")
        if "folded" in r and r["folded"] + r["kept"] == 0 and r.get("adapters"):
            out.append(f"{p} found no region for any of {r['adapters']} adapters (left in, unreported)")
        if r.get("noop_layered", r.get("noop_folded")):
            out.append(f"{p} fold without adapters folded the model's own layers: "
                       f"{r.get('noop_layered', r.get('noop_folded'))[0]}")
        if r.get("noop_raised"):
            out.append(f"{p} fold without adapters added operators: "
                       + ", ".join(f"{k} {v}" for k, v in r["noop_raised"].items()))
        if r.get("into_adapter"):
            out.append(f"{p} folded into an adapter's own layer, which still runs: {r['into_adapter'][0]}")
        if r.get("max_err", 0) > tol:
            out.append(f"{p} fold error {r['max_err']:.1e} > {tol:.1e}")
        if r.get("export_err", 0) > tol:
            out.append(f"{p} unfaithful export: the export with adapters is {r['export_err']:.1e} off eager")
            if r.get("base_export_err", math.inf) <= tol:  # the base exports faithfully: what insert made does not
                out.append(f"{p} export of the model with adapters unfaithful while the base's is faithful "
                           f"({r['base_export_err']:.1e}): a repfold defect"
                           if row.get("variant") != "lora" and row.get("source") != "peft" else
                           f"{p} export of PEFT's model unfaithful while the base's is faithful "
                           f"({r['base_export_err']:.1e})")
        elif r.get("e2e_err", 0) > tol and r.get("max_err", 0) <= tol:
            out.append(f"{p} end-to-end error {r['e2e_err']:.1e} > {tol:.1e} (the deployed artifact against eager)")
        if r.get("det_err", 0) > det_tolerance(r):
            out.append(f"{p} the detector with the folded backbone is {r['det_err']:.1e} off the adapted one"
                       + (f" ({r['det_note']})" if r.get("det_note") else ""))
        if r.get("ops_ok") is False:
            out.append(f"{p} more operators than {r.get('ops_vs', 'base')}: {r.get('ops_over')}")
        if r.get("params_ok") is False:
            out.append(f"{p} more parameters than base (+{r.get('params_delta')})")
        of = f" ({r['ref_of']})" if r.get("ref_of") else ""
        if r.get("ref_ops_ok") is False:
            out.append(f"{p} over reference{of}: more operators than {r.get('ref')}: {r.get('ref_over')}")
        if r.get("ref_params_ok") is False:
            out.append(f"{p} over reference{of}: more parameters than {r.get('ref')} (+{r.get('ref_params_delta')})")
        if r.get("ref_error"):
            out.append(f"{p} reference {r.get('ref')} failed: {r['ref_error']}")
        if r.get("changed") is False:
            out.append(f"{p} adapters had no effect on the output")
    return out


# ----------------------------------------------------------------------------------------------- report

def _cell(r: dict | None) -> str:
    if not r:
        return "–"
    st = r.get("status", "?")
    if st in ("not traceable", "export failed", "crash") and "max_err" not in r:
        return f"**{st}** ({r.get('stage')}): {short(r.get('error'), 70)}"
    bits = [st if st == "ok" else f"**{st}**"]
    if "folded" in r:
        kept = f"{r['kept']} kept" + (" (" + "; ".join(f"{n}× {k}" for k, n in r["kept_reasons"].items()) + ")"
                                      if r["kept"] else "")
        bits.append(f"{r['folded']} folded, {kept}")
    if "folded" in r and r["folded"] + r["kept"] == 0 and r.get("adapters"):
        bits.append("**no region found**")
    if "max_err" in r:
        bits.append(f"err {r['max_err']:.1e}")
    if "e2e_err" in r and "export_err" in r:  # the fx path's artifact is the eager model: its e2e is its err
        bits.append(f"e2e {r['e2e_err']:.1e}, export {r['export_err']:.1e}")
    if "det_err" in r:
        unstable = r.get("det_noise", 0) * NOISE_MARGIN > tolerance(r)
        bits.append(f"detector {r['det_err']:.1e} ({r.get('detections')} boxes"
                    + (f"; its own float32 rounding {r['det_noise']:.0e}: not judged)" if unstable else ")"))
    if r.get("noop_bitwise"):
        bits.append("noop bitwise")
    elif r.get("noop_folded") and r.get("noop_err", 1.0) <= tolerance(r):
        own = [f"{r[k]} {w}" for k, w in (("noop_scales", "scales"), ("noop_merged", "branch sums")) if r.get(k)]
        bits.append(f"noop folds its own ({', '.join(own) or 'regions'}), err {r['noop_err']:.0e}")
    else:
        bits.append("noop **differs**")
    if r.get("ops_ok") is False:
        bits.append(f"**ops over**: {r.get('ops_over')}")
    if r.get("params_ok") is False:
        bits.append("**more params**")
    elif r.get("params_delta", 0) > 0:
        bits.append(f"+{r['params_delta']} params: new biases")
    if r.get("ref_ops_ok") is False or r.get("ref_params_ok") is False:
        over = r.get("ref_over") or f"+{r.get('ref_params_delta')} params"
        bits.append(f"**over {r.get('ref')}**: {over}")
    elif "ref_ops_n" in r:
        of = " (the fold without adapters: regions kept)" if r.get("ref_of") else ""
        bits.append(f"ops {r['ref_got_n']} ≤ {r['ref_ops_n']} of {r['ref']}{of}")
    elif r.get("ref_error"):
        bits.append(f"{r.get('ref')} failed: {short(r['ref_error'], 50)}")
    if r.get("noop_layered", r.get("noop_folded")):
        bits.append(f"**noop folded layers {len(r.get('noop_layered', r.get('noop_folded')))}**")
    if r.get("changed") is False:
        bits.append("**no effect**")
    if "fold_s" in r:
        bits.append(f"{r['fold_s']:.2f} s")
    return ", ".join(bits)


def summary(rows: list[dict]) -> dict:
    tried = [r for r in rows if "excluded" not in r]
    s = {"models listed": len(rows), "excluded": len(rows) - len(tried), "tried": len(tried),
         "built": sum(1 for r in tried if "input" in r),
         "fx traced": sum(1 for r in tried if r.get("traced") == "fx"),
         "traced by torch.export (fx failed)": sum(1 for r in tried if r.get("traced") == "torch.export"),
         "insert traced by torch.export": sum(1 for r in tried if r.get("insert_traced_by")),
         "with a reference merge": sum(1 for r in tried if r.get("reference")),
         "timeouts": sum(1 for r in tried if r.get("timeout")),
         "wrong axis (models)": sum(1 for r in tried if r.get("wrong_axis"))}
    for p in PATHS:
        done = [r["paths"][p] for r in tried if p in r.get("paths", {})]
        if not done:
            continue
        s[f"{p}: run"] = len(done)
        for st in STATUSES:
            s[f"{p}: {st}"] = sum(1 for d in done if d.get("status") == st)
        s[f"{p}: exact against eager"] = sum(1 for d in done if d.get("e2e_err", math.inf) <= tolerance(d))
        s[f"{p}: noop not bitwise"] = sum(1 for d in done if d.get("noop_bitwise") is False)
        s[f"{p}: ops over base"] = sum(1 for d in done if d.get("ops_ok") is False)
        s[f"{p}: ops over reference"] = sum(1 for d in done if d.get("ref_ops_ok") is False)
        s[f"{p}: regions folded"] = sum(d.get("folded", 0) for d in done)
        s[f"{p}: regions kept"] = sum(d.get("kept", 0) for d in done)
    return s


def verdict(row: dict) -> dict:
    """One model's answers to the user's questions, over the paths it ran: is every deployed artifact exact
    against the eager model with adapters (``exact``; None: no path got that far), does every one cost no more
    than the base and the reference merge (``cost_ok``; None: none measured), did an exporter itself betray
    the model (``unfaithful``), did anything crash (``crash``: repfold, the harness, a timeout)."""
    done = row.get("paths", {}).values()
    e2e = [(d["e2e_err"], tolerance(d)) for d in done if "e2e_err" in d]
    costs = [d.get(k) for d in done for k in ("ops_ok", "params_ok", "ref_ops_ok", "ref_params_ok")
             if k in d]
    crash = bool(row.get("timeout") or row.get("died") or row.get("insert_error")
                 or any(d.get("status") == "crash" for d in done))
    return {"exact": all(e <= t for e, t in e2e) if e2e else None,
            "cost_ok": all(costs) if costs else None,
            "unfaithful": any(d.get("status") == "unfaithful export" for d in done),
            "wrong": any(d.get("status") == "wrong" for d in done), "crash": crash}


def by_ecosystem(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per ecosystem (torchvision, timm, hf, hf + peft, ultralytics, diffusers + peft): models tried, judged end to end (a path got as far
    as a deployed artifact; rows of runs before ``e2e_err`` have none), exact against eager on every path,
    cost within the base and the reference on every path, any exporter unfaithful, any wrong, any crash."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        if "excluded" in r:
            continue
        v, d = verdict(r), out.setdefault(ecosystem(r), dict.fromkeys(
            ("tried", "judged end to end", "exact against eager", "cost ≤ base, reference", "exporter unfaithful",
             "wrong", "crashes"), 0))
        d["tried"] += 1
        d["judged end to end"] += v["exact"] is not None
        d["exact against eager"] += v["exact"] is True
        d["cost ≤ base, reference"] += v["cost_ok"] is True
        d["exporter unfaithful"] += v["unfaithful"]
        d["wrong"] += v["wrong"]
        d["crashes"] += v["crash"]
    if len(out) > 1:
        out["all"] = {k: sum(d[k] for d in out.values()) for k in next(iter(out.values()))}
    return out


def kept_by_reason(rows: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        for p, d in r.get("paths", {}).items():
            for why, n in d.get("kept_reasons", {}).items():
                out.setdefault(why, {}).setdefault(p, 0)
                out[why][p] += n
    return out


def write_md(rows: list[dict], path: Path, note: str = "") -> None:
    s = summary(rows)
    lines = ["# repfold model zoo", "",
             "Generated by `python benchmarks/zoo.py` (`make zoo`); the rules for the model list, inputs, adapters",
             "and checks are in the script's docstring. Paths: **fx** (`repfold.insert`/`fold` on the module),",
             "**onnx** (TorchScript exporter, opset 17), **dynamo** (`torch.onnx.export(dynamo=True)`), **export**",
             "(`torch.export.export` of the model with adapters, then `repfold.fold(ep)`). Every deployed artifact is",
             "judged against the eager model with adapters (the user's truth).",
             "A cell: status, regions folded/kept (reasons), the fold's own error (folded against unfolded artifact)",
             "relative to the output's max abs, on the exporter paths the end-to-end error (folded artifact against",
             "eager) and the exporter's own (unfolded export against eager), whether the fold without adapters is",
             "bitwise, the operators against the reference merge where the row has one, and the fold time.", ""]
    if note:
        lines += [note, ""]
    total = sum(r.get("time_s", 0) for r in rows if "excluded" not in r)
    lines += [(f"Time: {total / 60:.1f} min, the sum of the {len(rows)} models' own times (each in its own process, "
               f"{os.cpu_count()} CPUs, nice 19; with `--jobs N` a run takes less wall time, each model more), "
               "per-model timeout as given by `--timeout`."), ""]
    eco = by_ecosystem(rows)
    if eco:
        cols = list(next(iter(eco.values())))
        lines += ["## By ecosystem", "",
                  ("A model counts as exact when every path's deployed artifact is within tolerance of the eager "
                   "model with adapters, and within cost when no path has more operators or parameters than the "
                   "base or the reference merge (PEFT's `merge_and_unload`, timm's `reparameterize_model`)."), "",
                  "| ecosystem | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {k} | " + " | ".join(str(d[c]) for c in cols) + " |" for k, d in eco.items()] + [""]
    lines += ["## Summary", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in s.items()] + [""]
    kept = kept_by_reason(rows)
    if kept:
        lines += ["### Regions kept, by reason", "", "| reason | " + " | ".join(PATHS) + " |",
                  "|---|" + "---|" * len(PATHS)]
        lines += [f"| {why} | " + " | ".join(str(d.get(p, 0)) for p in PATHS) + " |" for why, d in
                  sorted(kept.items(), key=lambda kv: -sum(kv[1].values()))]
        lines.append("")
    bad = [(r["id"], p) for r in rows for p in problems(r)]
    lines += ["## Problems found", ""]
    lines += [f"* `{m}`: {p}" for m, p in bad] or ["none"]
    lines += ["", "## Left out", "", "| rule / model | reason |", "|---|---|"]
    lines += [f"| rule `{k}` | {v} |" for k, v in EXCLUDE_RULES.items()]
    lines += [f"| `{k}` | {v} |" for k, v in EXCLUDED.items()]
    lines += [f"| `{r['id']}` | {r['excluded']} |" for r in rows if "excluded" in r and r["id"] not in EXCLUDED]
    lines += ["", "## Models", "",
              "| model | family | input | traced | adapters | axis | " + " | ".join(PATHS) + " | time |",
              "|---|---|---|---|---|---|" + "---|" * len(PATHS) + "---|"]
    for r in rows:
        if "excluded" in r:
            continue
        if "input" not in r:
            lines.append(f"| `{r['id']}` | {r['family']} | – | **build failed**: {short(r.get('build_error'), 80)}"
                         f"{' (timeout)' if r.get('timeout') else ''} | | |" + " |" * len(PATHS)
                         + f" {r.get('time_s', '')} |")
            continue
        traced = r.get("traced", "?") + (f": {short(r.get('trace_error'), 60)}" if r.get("trace_error") else "")
        traced += "; insert: torch.export" if r.get("insert_traced_by") else ""
        ad = f"{r.get('adapters', 0)} {r.get('scope_kind', '')}".strip()
        if r.get("insert_error"):
            ad += f"; **insert crash**: {short(r['insert_error'], 60)}"
        ad += "".join(f" ({n})" for n in r.get("insert_note", []))
        if r.get("peft_targets"):
            ad += f" on {', '.join(r['peft_targets'])}"
        if r.get("peft_cannot"):
            ad += f"; cannot target: {', '.join(r['peft_cannot'])}"
        if r.get("reference"):
            ad += f"; reference: {r['reference']}"
        axis = (f"**wrong axis** ({len(r['wrong_axis'])})" if r.get("wrong_axis")
                else f"ok ({r['axis_checked']})" if r.get("axis_checked") else "–")
        cells = [_cell(r["paths"].get(p)) for p in PATHS]
        to = f" **timeout** ({r['timeout']} s)" if r.get("timeout") else ""
        lines.append(f"| `{r['id']}` | {r['family']} | {r['input']} | {traced} | {ad} | {axis} | "
                     + " | ".join(cells) + f" | {r.get('time_s', '')} s{to} |")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------- driver

def _child(model_id: str, paths: tuple, out: str) -> None:
    import torch

    torch.manual_seed(0)

    def progress(row):
        tmp = out + ".tmp"
        Path(tmp).write_text(json.dumps(row, default=str))
        os.replace(tmp, out)

    progress(run_model(model_id, paths, progress))


def run_in_subprocess(entry: dict, paths: tuple, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "row.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", entry["id"], "--paths", ",".join(paths),
               "--child-out", out]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, check=False)
            err = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
            timed_out = False
        except subprocess.TimeoutExpired:
            err, timed_out = [], True
        row = json.loads(Path(out).read_text()) if os.path.exists(out) else {
            "id": entry["id"], "source": entry["source"], "family": entry["family"], "paths": {}}
        if timed_out:
            row["timeout"] = int(timeout)
        elif err and not row.get("paths") and "excluded" not in row:
            row.setdefault("build_error", f"process died: {err[0][:200]}")
        elif proc.returncode and not timed_out:
            row["died"] = f"exit {proc.returncode}: {err[0][:200] if err else ''}"
        row["time_s"] = round(time.perf_counter() - t, 2)
        return row


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), 1 <= I <= N."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise SystemExit(f"--shard takes I/N with 1 <= I <= N, not {text!r}")
    return int(m[1]), int(m[2])


def merge_shards(out: Path, stem: str, order: list[str]) -> None:
    """OUT/STEM.json and .md from OUT/STEM.json and the shards' OUT/STEM.shard*.json: one row per model, a shard's
    (the newest file's) over an older one, in the order of the model list (then any others)."""
    files = sorted(out.glob(f"{stem}.shard*of*.json"), key=lambda f: f.stat().st_mtime)
    if (out / f"{stem}.json").exists():
        files.insert(0, out / f"{stem}.json")
    rows: dict[str, dict] = {}
    for f in files:
        rows.update({r["id"]: r for r in json.loads(f.read_text())})
    rank = {m: i for i, m in enumerate(order)}
    merged = sorted(rows.values(), key=lambda r: rank.get(r["id"], len(rank)))
    (out / f"{stem}.json").write_text(json.dumps(merged, indent=1, default=str))
    missing = [m for m in order if m not in rows]
    write_md(merged, out / f"{stem}.md",
             note=f"{len(merged)} of {len(order)} models done." if missing else "")
    print(f"merged {len(files)} files, {len(merged)} models ({len(missing)} of the list missing) into "
          f"{out / (stem + '.md')}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma-separated ids (torchvision:NAME, timm:NAME) or bare names")
    ap.add_argument("--subset", choices=["ci"], help="the fixed subset of tests/test_zoo.py")
    ap.add_argument("--paths", default=",".join(PATHS), help="which of fx,onnx,dynamo (default: all)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for zoo.md and zoo.json")
    ap.add_argument("--jobs", type=int, default=1, help="models at a time, each in its own process")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per model (more where TIMEOUTS says)")
    ap.add_argument("--list", action="store_true", help="print the model list and exit")
    ap.add_argument("--source", choices=["torchvision", "timm"], help="only the models of one source")
    ap.add_argument("--render", action="store_true", help="only write OUT/NAME.md again from OUT/NAME.json")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in OUT/NAME.json, run the rest")
    ap.add_argument("--redo", default="", help="with --resume: comma-separated ids to run again all the same")
    ap.add_argument("--shard", help="I/N: run only the I-th of N shares of the list (1-based; every N-th model "
                                    "from the I-th), into OUT/NAME.shardIofN.{json,md}; --resume resumes it")
    ap.add_argument("--merge", action="store_true",
                    help="write OUT/NAME.{json,md} from OUT/NAME.json and every OUT/NAME.shard*.json (newest wins)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    paths = tuple(p for p in a.paths.split(",") if p)
    if a.child:
        return _child(a.child, paths, a.child_out)
    listed = model_list()
    if a.models:
        entries = [resolve(m.strip(), listed) for m in a.models.split(",") if m.strip()]
    elif a.subset == "ci":
        hf = {r["id"] for r in listed if r["source"] == "hf"}  # none without transformers
        entries = [resolve(m, listed) for m in CI_SUBSET if not m.startswith("hf:") or m in hf]
    else:
        entries = listed
    if a.source:
        entries = [e for e in entries if e["source"] == a.source]
    shard = ""
    if a.shard:
        i, n = parse_shard(a.shard)
        entries, shard = entries[i - 1::n], f".shard{i}of{n}"
    if a.list:
        for e in entries:
            print(f"{e['id']:60s} {e['family']}" + (f"   LEFT OUT: {EXCLUDED[e['id']]}" if e["id"] in EXCLUDED else ""))
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "zoo" if not (a.models or a.subset) else f"zoo_{a.subset or 'models'}"  # zoo.md: the full list only
    if a.merge:
        return merge_shards(out, stem, [e["id"] for e in entries])
    stem += shard
    if a.render:
        return write_md(json.loads((out / f"{stem}.json").read_text()), out / f"{stem}.md")
    rows: dict[str, dict] = {}
    if a.resume and (out / f"{stem}.json").exists():
        wanted = {e["id"] for e in entries}
        redo = {resolve(m.strip(), listed)["id"] for m in a.redo.split(",") if m.strip()}
        rows = {r["id"]: r for r in json.loads((out / f"{stem}.json").read_text())
                if r["id"] in wanted and r["id"] not in redo}
    todo = [e for e in entries if e["id"] not in rows]
    t0 = time.perf_counter()

    def one(entry):
        row = run_in_subprocess(entry, paths, max(a.timeout, TIMEOUTS.get(entry["id"], (0,))[0]))
        rows[entry["id"]] = row
        ordered = [rows[e["id"]] for e in entries if e["id"] in rows]
        (out / f"{stem}.json").write_text(json.dumps(ordered, indent=1, default=str))
        write_md(ordered, out / f"{stem}.md",
                 note=f"{len(ordered)} of {len(entries)} models done." if len(ordered) < len(entries) else "")
        probs = problems(row)
        print(f"[{len(ordered)}/{len(entries)}] {entry['id']}: {row.get('time_s')} s, "
              + ("; ".join(probs) if probs else row.get("excluded", "ok")), flush=True)

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        list(pool.map(one, todo))
    print(f"wrote {out / (stem + '.md')} in {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
