"""Fit-to-budget planner: predict memory and speed of a (pruned, quantized) model on a device, pick a plan.

One module per concern:

* :mod:`.shapes` — model shapes from a config or a loaded model; the config-only uniform pruned shape;
* :mod:`.tensor_bytes` — what each tensor and the KV cache cost on the runtime;
* :mod:`.prediction` — memory, file size, decode and prefill speed on a profile;
* :mod:`.costs` — what one KV group / MLP channel costs against the binding budget (cost-aware allocation);
* :mod:`.judge` — budget pass/fail, the one home for it (plan, verify and report use it);
* :mod:`.search` — candidates and the choice of what to ship;
* :mod:`.host_fit` — host calibration from measured runs.

Nothing here loads weights or runs a model.
"""
from .host_fit import (HostCalibration, HostRun, apply_calibration, calibrate_host, host_run_from_verify,
                       memory_noise_mb, settle_overhead)
from .judge import Verdict, budgets_of, judge
from .prediction import MIB, Prediction, compare, predict
from .search import DEFAULT_RATIOS, Candidate, PlanResult, PriorQuality, check, format_table, least_ratio, plan
from .shapes import ModelShape, model_shape, pruned_shape, shape_from_config
from .tensor_bytes import (ZERO_FFN_PAD, TensorSpec, group_bytes, kv_alloc_tokens, kv_bytes, kv_cache_bytes,
                           kv_elem_bytes, llama_cpp_tensors, matmul_params, onnx_tensors, tensors, weight_bytes)

__all__ = ["HostCalibration", "HostRun", "apply_calibration", "calibrate_host", "host_run_from_verify",
           "memory_noise_mb", "settle_overhead", "Verdict",
           "budgets_of", "judge", "MIB", "Prediction", "compare", "predict", "DEFAULT_RATIOS", "Candidate",
           "PlanResult", "PriorQuality", "check", "format_table", "least_ratio", "plan", "ModelShape", "model_shape", "pruned_shape",
           "shape_from_config", "ZERO_FFN_PAD", "TensorSpec", "group_bytes", "kv_alloc_tokens", "kv_bytes", "kv_cache_bytes",
           "kv_elem_bytes",
           "llama_cpp_tensors", "matmul_params", "onnx_tensors", "tensors", "weight_bytes"]
