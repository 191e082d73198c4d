"""Model runtimes: torch eager, and ONNX Runtime with the graph exported once per architecture.

benchmarks/serving.py measures both on this model size (PLE, ~8.5 M parameters, almost all in the
id embeddings): ONNX Runtime runs the same graph 2-3x faster on CPU, because a forward of eager
torch is dominated by per-operator dispatch, not by arithmetic. So ``MTL_SERVE_RUNTIME=auto``
picks ONNX Runtime when it is installed, torch otherwise, and torch stays the fallback whenever
an export fails or disagrees with torch.

Exporting (``torch.onnx.export``, dynamo) takes seconds, so :class:`OnnxExporter` exports a graph
once per ``model_args`` and, for each later snapshot of the same architecture, writes the
snapshot's tensors into a copy of that graph's initializers (~0.1 s). The export keeps every
parameter and buffer as a named initializer (``optimize=False``); ONNX Runtime's own graph
optimiser folds constants when the session is built, after the weights are in place (passing
them with ``SessionOptions.add_initializer`` instead would be folded *before* the override).
Every ONNX session is checked against torch on a probe batch before it may serve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from learner.features import EncodedBatch, FeatureSpec
from learner.models import RankingModel

__all__ = [
    "OnnxExporter",
    "OnnxRuntime",
    "OnnxUnavailableError",
    "TorchRuntime",
    "onnx_available",
    "probe_batch",
]

logger = logging.getLogger(__name__)

#: Agreement required between an ONNX session and torch on the probe batch.
PARITY_RTOL = 1e-4
PARITY_ATOL = 1e-5


class OnnxUnavailableError(RuntimeError):
    """ONNX Runtime is not installed, or this model could not be exported or verified."""


def onnx_available() -> bool:
    """Return whether onnx, onnxruntime and onnxscript (the dynamo exporter) import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _stack(model: RankingModel, preds: dict[str, Tensor]) -> Tensor:
    return torch.stack([preds[t] for t in model.tasks], dim=1)  # (B, T)


class TorchRuntime:
    """Torch eager: ``RankingModel.predict`` under ``inference_mode``."""

    name = "torch"

    def __init__(self, model: RankingModel) -> None:
        self.model = model.eval()

    def predict(self, batch: EncodedBatch) -> NDArray[np.float32]:
        """Return predictions (B, T) in ``model.tasks`` order."""
        cat, dense = batch.to_tensors()
        with torch.inference_mode():
            out = _stack(self.model, self.model.predict(cat, dense))  # (B, T)
        return out.numpy()


class OnnxRuntime:
    """An ONNX Runtime session computing the model's predictions (B, T)."""

    name = "onnx"

    def __init__(self, session: Any) -> None:
        # onnxruntime.InferenceSession: run() releases the GIL and is safe from several threads
        self.session = session

    def predict(self, batch: EncodedBatch) -> NDArray[np.float32]:
        """Return predictions (B, T) in the exported model's task order."""
        out = self.session.run(None, {"cat": batch.cat, "dense": batch.dense})[0]
        return np.asarray(out, dtype=np.float32)


class _Predictions(nn.Module):
    """The exported graph: (cat, dense) -> predictions (B, T), as ``RankingModel.predict``."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, cat: Tensor, dense: Tensor) -> Tensor:
        return _stack(self.model, self.model.to_predictions(self.model(cat, dense)))


def probe_batch(spec: FeatureSpec, rows: int = 16, seed: int = 0) -> EncodedBatch:
    """A deterministic batch covering every bucket range and missing dense values (NaN)."""
    rng = np.random.default_rng(seed)
    cat = np.zeros((rows, len(spec.categorical)), dtype=np.int64)  # (B, Fc)
    for j, f in enumerate(spec.categorical):
        cat[:, j] = rng.integers(0, f.buckets, size=rows)
    dense = rng.normal(0.0, 3.0, size=(rows, len(spec.dense))).astype(np.float32)  # (B, Fd)
    dense[rng.random(dense.shape) < 0.2] = np.nan
    return EncodedBatch(cat=cat, dense=dense)


# the exporter logs each pass at INFO and a missing torchvision at WARNING, once per export
_EXPORT_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")


@contextlib.contextmanager
def _quiet(names: tuple[str, ...]) -> Iterator[None]:
    """Raise these third-party loggers to ERROR for the duration of one export."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export(model: RankingModel, example: EncodedBatch) -> Any:
    """Export the model's prediction graph (dynamic batch) and return its ``onnx.ModelProto``."""
    cat, dense = example.to_tensors()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # no_grad: the graph must be the inference one (gates.fuse picks its form by grad mode;
    # exported with grad on, the training form ran 35 % slower in ONNX Runtime)
    with warnings.catch_warnings(), _quiet(_EXPORT_LOGGERS), torch.no_grad():
        # the exporter warns about the gates' bookkeeping attributes and its own dim naming
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Predictions(model).eval(),
            (cat, dense),
            dynamo=True,
            input_names=["cat", "dense"],
            output_names=["preds"],
            dynamic_shapes=({0: batch}, {0: batch}),
            optimize=False,
            verbose=False,
        )
    if program is None:  # only without dynamo=True; keeps mypy's Optional honest
        raise OnnxUnavailableError("torch.onnx.export returned no program")
    return program.model_proto


def _filled(graph: Any, model: RankingModel) -> Any:
    """A copy of ``graph`` whose initializers hold ``model``'s tensors (names ``model.*``)."""
    import onnx
    from onnx import numpy_helper

    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    proto = onnx.ModelProto()
    proto.CopyFrom(graph)
    filled = 0
    for init in proto.graph.initializer:
        tensor = state.get(init.name)
        if tensor is None:
            continue
        array = tensor.detach().cpu().numpy()
        new = numpy_helper.from_array(array, init.name)
        if new.data_type != init.data_type or list(new.dims) != list(init.dims):
            raise OnnxUnavailableError(
                f"initializer {init.name}: snapshot {array.dtype}{list(array.shape)} does not "
                f"match the exported graph's type {init.data_type}{list(init.dims)}"
            )
        init.CopyFrom(new)
        filled += 1
    if filled == 0:
        raise OnnxUnavailableError("the exported graph names none of the model's tensors")
    return proto


class OnnxExporter:
    """Builds verified ONNX Runtime sessions, exporting each architecture's graph only once."""

    def __init__(self, threads: int = 1, cache_size: int = 2) -> None:
        if not onnx_available():
            raise OnnxUnavailableError(
                "ONNX Runtime needs onnx, onnxruntime and onnxscript (pip install -e '.[dev]')"
            )
        # intra-op threads of each session
        self.threads = threads
        # graphs kept, by model_args JSON; architectures rarely change, two cover a switch
        self.cache_size = cache_size
        self._graphs: OrderedDict[str, Any] = OrderedDict()
        # swaps build in worker threads; one export at a time
        self._lock = threading.Lock()

    def _graph(self, model: RankingModel, probe: EncodedBatch) -> Any:
        key = json.dumps(model.model_args, sort_keys=True)
        with self._lock:
            graph = self._graphs.get(key)
            if graph is None:
                logger.info("exporting an ONNX graph for a new architecture (takes seconds)")
                try:
                    graph = _export(model, probe)
                except Exception as exc:  # the exporter raises many types; torch stays the fallback
                    raise OnnxUnavailableError(f"ONNX export failed: {exc}") from exc
                self._graphs[key] = graph
                while len(self._graphs) > self.cache_size:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(key)
            return graph

    def _session(self, proto: Any) -> Any:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )

    def runtime(self, model: RankingModel) -> OnnxRuntime:
        """Return an ONNX runtime for ``model``, verified against torch on a probe batch."""
        probe = probe_batch(model.args.features)
        runtime = OnnxRuntime(self._session(_filled(self._graph(model, probe), model)))
        expected = TorchRuntime(model).predict(probe)  # (B, T)
        got = runtime.predict(probe)
        if got.shape != expected.shape or not np.allclose(
            got, expected, rtol=PARITY_RTOL, atol=PARITY_ATOL, equal_nan=True
        ):
            diff = float(np.nanmax(np.abs(got - expected))) if got.shape == expected.shape else -1
            raise OnnxUnavailableError(f"ONNX predictions differ from torch (max diff {diff:.3g})")
        return runtime
