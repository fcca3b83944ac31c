"""PyTorch backend: find quantizable layers and apply any policy reversibly.

A policy is applied in place and undone on exit: each quantized layer's weight is
swapped for its fake-quantized copy (cached, computed once per layer and format), and
formats that quantize activations get a forward pre-hook on the layer's input: a calibrated
quantizer, or for dynamic formats one from each input tensor's own range, per call (what
onnxruntime's ``DynamicQuantizeLinear`` does). Calibrated formats also requantize the layer's
output with a calibrated quantizer (a forward hook), as onnxruntime's static integer kernels
write it. The model is never deep-copied.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch
from torch import nn

from analysis.quant.formats import DYNAMIC_CONV_REASON, QuantFormat, get_format
from analysis.data.batch import repeat_to, sample_shapes, take, to_numpy
from analysis.models.base import LayerInfo, ModelError
from analysis.models.outputs import OutputSpec, flatten_outputs, output_spec
from analysis.models.structure import Structure, fx_structure
from analysis.models.torch_graph import UNSET, BatchValues, Carried, InplaceError, TracedGraph
from analysis.quant.act import ActivationStats, ActQuant, check_finite, fake_quantize_dynamic
from analysis.quant.primitives import (HIST_BINS, RangeObserver, StreamingHistogram, fake_quantize_weight, group_size_error,
                                       swap_transposed_conv_layout, transposed_conv_error)

TRANSPOSED_CONV = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_CONV)


def state_sha256(module: nn.Module) -> str:
    """Content hash of a module's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too (BatchNorm's counter)
    return h.hexdigest()


def _oik(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """A layer's weight in the engine's (out, in, *kernel) layout, and back (the regrouping is its own inverse):
    a transposed convolution stores (in, out/groups, *kernel)."""
    return swap_transposed_conv_layout(W, module.groups) if isinstance(module, TRANSPOSED_CONV) else W


def _macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-accumulates per sample for one call reading ``x`` and producing ``out``."""
    per_sample_out = out[0].numel() if out.dim() > 1 else out.numel()
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    if isinstance(module, TRANSPOSED_CONV):  # each input element meets out/groups * kernel weights
        return x[0].numel() * module.weight[0].numel()
    k = module.weight[0].numel()  # in/groups * prod(kernel)
    return per_sample_out * k


class TorchModel:
    """A ``torch.nn.Module`` in eval mode plus what the engine knows about its layers."""

    kind = "torch"

    def __init__(self, module: nn.Module, example, *, name: str, source: str, output: str | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise ModelError(f"{source}: expected a torch.nn.Module, got {type(module).__name__}")
        self.module = module.eval()
        self.name, self.source = name, source
        self.sha256 = state_sha256(module)
        self.modules = dict(module.named_modules())
        self.act_quant: dict[tuple[str, str], ActQuant] = {}
        self.out_quant: dict[tuple[str, str], ActQuant] = {}  # (layer, format) -> requantization of the output
        self.formats: dict[str, QuantFormat] = {}  # this analysis' formats (observer/group overrides)
        self._weight_cache: dict[tuple[str, str], torch.Tensor] = {}
        self._bias_after: set[str] = set()  # Linear layers the ONNX export runs as MatMul, then Add(bias)
        self.outputs: OutputSpec = self._find_outputs(example, output)
        self._layers = self._discover(example)
        if not self._layers:
            raise ModelError(f"{source}: no quantizable layers (Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d) run on "
                             f"the task's inputs")
        ran = {info.name for info in self._layers}
        self.not_analysed: list[tuple[str, str]] = [  # (module, reason)
            (n, "did not run on the task's inputs") for n, m in self.modules.items()
            if n and isinstance(m, QUANTIZABLE) and n not in ran]

    def _call(self, x):
        """The module on a batch: a tensor, or a dict of tensors passed by input name."""
        return self.module(**x) if isinstance(x, dict) else self.module(x)

    def _canon(self, y) -> torch.Tensor:
        """What the metric compares, from the module's return value (``outputs``)."""
        return self.outputs.combine([t for _, t in flatten_outputs(y)])

    def _find_outputs(self, example, select: str | None) -> OutputSpec:
        """Which outputs the metric compares, along which axis: from runs on 2 and 3 samples (a shorter
        example's samples repeated)."""
        if isinstance(example, dict):
            _check_argument_names(self.module, list(example), self.source)
        example = repeat_to(example, 3)
        na, nb = 2, 3
        ys = []
        for n in (na, nb):
            try:
                with torch.no_grad():
                    y = self._call(take(example, slice(0, n)))
            except Exception as e:
                if n == nb and ys:  # a model that takes one fixed batch size: the first run tells what it can
                    break
                raise ModelError(f"{self.source}: inputs of shape {_sample_shapes(example)} are rejected by the model "
                                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
            ys.append(flatten_outputs(y))
        if not ys[0]:
            raise ModelError(f"{self.source}: the model returns no tensor ({type(y).__name__})")
        names = [k for k, _ in ys[0]]
        first = [t for _, t in ys[0]]
        second = [t for _, t in ys[1]] if len(ys) > 1 and [k for k, _ in ys[1]] == names else None
        return output_spec(names, first, na, second, nb if second is not None else None, select, where=self.source)

    def _discover(self, example) -> list[LayerInfo]:
        seen: dict[str, LayerInfo] = {}
        readers: dict[tuple, str] = {}  # identity of an input tensor -> first layer that read it
        alive: list = []  # hold every input so no later tensor can reuse its address during discovery
        hooks = []

        def hook(name):
            def fn(mod, inputs, out):
                if name in seen or not isinstance(out, torch.Tensor):
                    return
                W = _oik(mod, mod.weight)
                x = inputs[0]
                alive.append(x)
                # torch.onnx writes Gemm for a 2-D input with a bias, else MatMul [+ Add]: the kernel's output,
                # which onnxruntime requantizes, is then the product before the bias is added
                if isinstance(mod, nn.Linear) and mod.bias is not None and x.dim() != 2:
                    self._bias_after.add(name)
                ident = (x.data_ptr(), tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else (id(x),)
                group = readers.setdefault(ident, name)
                seen[name] = LayerInfo(
                    name=name, type=type(mod).__name__, order=len(seen), weight_shape=tuple(W.shape),
                    has_bias=mod.bias is not None, params=W.numel() + (mod.bias.numel() if mod.bias is not None else 0),
                    macs=_macs(mod, x, out), in_features=W[0].numel(), out_features=W.shape[0], input_group=group)
            return fn

        for name, mod in self.modules.items():
            if isinstance(mod, QUANTIZABLE) and name:
                hooks.append(mod.register_forward_hook(hook(name)))
        try:
            with torch.no_grad():
                self._call(take(example, slice(0, 1)))
        finally:
            for h in hooks:
                h.remove()
        return list(seen.values())

    def layers(self) -> list[LayerInfo]:
        return list(self._layers)

    def layer(self, name: str) -> LayerInfo:
        for info in self._layers:
            if info.name == name:
                return info
        raise KeyError(f"unknown layer '{name}'")

    def format(self, name: str) -> QuantFormat:
        """The format this model uses under ``name``: an override set by the analysis, else the registry's."""
        return self.formats.get(name) or get_format(name)

    def skip_reason(self, name: str, fmt: QuantFormat) -> str | None:
        """Why a layer cannot take a format (recorded in the Run), or None."""
        if fmt.is_dynamic and not isinstance(self.modules[name], nn.Linear):
            return DYNAMIC_CONV_REASON
        if fmt.weight is None:
            return None
        mod = self.modules[name]
        if isinstance(mod, TRANSPOSED_CONV) and (why := transposed_conv_error(mod.groups, fmt.weight)):
            return why
        return group_size_error(self.layer(name).weight_shape, fmt.weight)

    def fake_weight(self, name: str, fmt: QuantFormat) -> torch.Tensor:
        """The fake-quantized weight in the engine's (out, in, *kernel) layout (made anew, not kept)."""
        key = (name, fmt.name)
        return _oik(self.modules[name], self._weight_cache[key] if key in self._weight_cache else self._fake(name, fmt))

    def _fake(self, name: str, fmt: QuantFormat) -> torch.Tensor:
        mod = self.modules[name]
        W = mod.weight.detach()
        return _oik(mod, fake_quantize_weight(_oik(mod, W), fmt.weight).to(W.dtype)).contiguous()

    def _fake_stored(self, name: str, fmt: QuantFormat) -> torch.Tensor:
        """The fake-quantized weight as the module stores it (what ``quantized`` swaps in), made once and
        kept until ``release_fake_weights``: a sweep chunk reuses it on every batch."""
        key = (name, fmt.name)
        if key not in self._weight_cache:
            self._weight_cache[key] = self._fake(name, fmt)
        return self._weight_cache[key]

    def release_fake_weights(self) -> None:
        """Drop the kept fake-quantized weights (the sweep calls it after each chunk, so at most the weights
        of one chunk's jobs are held, not every layer x format)."""
        self._weight_cache.clear()

    def other_bytes(self) -> int:
        """Bytes of parameters and buffers outside the quantizable layers (kept as they are)."""
        layer_tensors = set()
        for info in self._layers:
            mod = self.modules[info.name]
            layer_tensors.add(id(mod.weight))
            if mod.bias is not None:
                layer_tensors.add(id(mod.bias))
        seen, total = set(), 0
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            if id(t) in layer_tensors or id(t) in seen:
                continue
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return total

    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def weight(self, name: str) -> torch.Tensor:
        """The layer's FP32 weight in the engine's layout (out, in, *kernel)."""
        mod = self.modules[name]
        return _oik(mod, mod.weight.detach().float())

    def activation_stats(self, calib_batches) -> ActivationStats:
        """Two streamed passes over the calibration data: min/max, then 2048-bin histograms."""
        ranges: dict[tuple[str, str], RangeObserver] = {}
        self._observe(calib_batches, lambda n, t, x: ranges.setdefault((n, t), RangeObserver()).update(x))
        check_finite(ranges)
        hists = {k: StreamingHistogram(r.lo, r.hi, HIST_BINS) for k, r in ranges.items()}
        self._observe(calib_batches, lambda n, t, x: hists[(n, t)].update(x))
        return ActivationStats(ranges, hists)

    def _observe(self, batches, on_tensor) -> None:
        hooks = []
        for info in self._layers:
            def fn(m, inputs, out, name=info.name):
                on_tensor(name, "input", inputs[0])
                on_tensor(name, "output", self._kernel_output(name, out))

            hooks.append(self.modules[info.name].register_forward_hook(fn))
        try:
            with torch.no_grad():
                for x in batches():
                    self._call(x)
        finally:
            for h in hooks:
                h.remove()

    def _kernel_output(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """What the layer's ONNX kernel writes: ``out``, or ``out`` less the bias the export adds after it."""
        return out - self.modules[name].bias if name in self._bias_after else out

    def _requantized(self, name: str, out: torch.Tensor, oq: ActQuant) -> torch.Tensor:
        """``out`` after the kernel's requantization (static integer kernels write uint8, not float)."""
        if name in self._bias_after:
            bias = self.modules[name].bias
            return oq(out - bias) + bias
        return oq(out)

    @contextmanager
    def quantized(self, policy: dict[str, str]):
        """Apply ``{layer: format}`` for the duration of the block; everything is restored after.

        A single layer's fake-quantized weight is kept for the next call (a sweep's job reruns it on every
        batch); a policy of several layers makes its weights for the block only, so that no more than one
        model's worth of them is ever held."""
        saved, hooks = [], []
        fake = self._fake_stored if len(policy) == 1 else self._fake
        try:
            for name, fmt_name in policy.items():
                fmt = self.format(fmt_name)
                if fmt.is_float or self.skip_reason(name, fmt):
                    continue
                mod = self.modules[name]
                if fmt.weight is not None:
                    saved.append((mod, mod.weight.data))
                    mod.weight.data = fake(name, fmt)
                if fmt.is_dynamic:
                    a = fmt.activation
                    hooks.append(mod.register_forward_pre_hook(
                        lambda m, args, a=a: (fake_quantize_dynamic(args[0], a.bits, a.symmetric), *args[1:])))
                elif fmt.activation is not None:
                    aq = self.act_quant[(name, fmt.name)]
                    hooks.append(mod.register_forward_pre_hook(lambda m, args, aq=aq: (aq(args[0]), *args[1:])))
                if (oq := self.out_quant.get((name, fmt.name))) is not None:
                    hooks.append(mod.register_forward_hook(lambda m, args, out, name=name, oq=oq:
                                                           self._requantized(name, out, oq)))
            yield self
        finally:
            for h in hooks:
                h.remove()
            for mod, data in reversed(saved):
                mod.weight.data = data

    def run(self, batch: torch.Tensor, policy: dict[str, str] | None = None) -> torch.Tensor:
        with torch.no_grad(), self.quantized(policy or {}):
            return self._canon(self._call(batch))

    def forward(self, x: torch.Tensor, capture=()) -> tuple[object, dict[str, torch.Tensor]]:
        """The output for a batch under the policy applied now, and the outputs of the ``capture`` layers."""
        outs: dict[str, torch.Tensor] = {}
        # a copy: a later in-place op (``out += identity``) would otherwise change the captured output
        hooks = [self.modules[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o.clone()))
                 for n in capture]
        try:
            y = self._call(x)
        finally:
            for h in hooks:
                h.remove()
        return self._canon(y), outs

    def reaches_output(self, x: torch.Tensor) -> dict[str, bool]:
        """A layer reaches the output if NaN in its output shows up there (for models that do not trace)."""
        out = {}
        for info in self._layers:
            h = self.modules[info.name].register_forward_hook(lambda m, i, o: torch.full_like(o, float("nan")))
            try:
                with torch.no_grad():
                    y = self._canon(self._call(take(x, slice(0, 2))))
                out[info.name] = bool(torch.isnan(y).any())
            except Exception:  # NaN can derail data-dependent code; then assume it reaches
                out[info.name] = True
            finally:
                h.remove()
        return out

    def structure(self) -> Structure:
        """Which layers feed each layer, from the module's ``torch.fx`` trace (none when it does not trace)."""
        return fx_structure(self.module, [info.name for info in self._layers])

    def incremental(self, x: torch.Tensor) -> tuple["TorchRecompute | None", str]:
        """The capability to recompute only what lies downstream of a layer, checked on ``x`` for every
        layer: the traced graph must reproduce the model, and after any one layer's weight is perturbed
        its recomputation must match a full forward and leave the cached values untouched.
        Returns it, or None and why."""
        names = [info.name for info in self._layers]
        x = take(x, slice(0, 2))
        with self.no_inplace(), torch.no_grad():
            try:
                graph = TracedGraph(self.module, names)
            except InplaceError as e:
                return None, f"{e}: cached values cannot be reused"
            except Exception as e:  # fx raises many types for untraceable code
                return None, f"torch.fx could not trace the model ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            env = graph.forward_all(x)
            try:
                same = torch.equal(self._canon(graph.output(env)), self._canon(self._call(x)))
            except Exception:  # noqa: BLE001 - an output of another structure
                same = False
            if not same:
                return None, "the traced graph does not reproduce the model's output"
            # an in-place write bumps a tensor's version counter: cheaper than comparing copies of every value
            versions = [v._version if isinstance(v, torch.Tensor) else None for v in env]
            for name in names:
                w = self.modules[name].weight
                saved = w.data
                w.data = saved + 0.05 * saved.abs().mean() * torch.sign(saved)  # any change will do
                try:
                    y_inc, _ = graph.rerun_from(env, name, x)
                    y_inc, y_full = self._canon(y_inc), self._canon(self._call(x))
                finally:
                    w.data = saved
                if not torch.allclose(y_inc, y_full, rtol=1e-5, atol=1e-6):
                    return None, (f"incremental recomputation after layer '{name}' did not match a full forward "
                                  f"(in-place operations?)")
                if any(isinstance(a, torch.Tensor) and a._version != v for a, v in zip(env, versions)):
                    return None, f"recomputing after layer '{name}' changed cached values (in-place operations?)"
        return TorchRecompute(self, graph), "traced"

    @contextmanager
    def evaluating(self):
        """Held while a sweep measures: no autograd, no ``inplace=True`` modules."""
        with torch.no_grad(), self.no_inplace():
            yield

    @contextmanager
    def no_inplace(self):
        """Turn off ``inplace=True`` on modules (e.g. ReLU) so cached activations stay intact."""
        changed = [m for m in self.modules.values() if getattr(m, "inplace", False) is True]
        for m in changed:
            m.inplace = False
        try:
            yield
        finally:
            for m in changed:
                m.inplace = True


class TorchRecompute:
    """Downstream-only recomputation on a traced torch model: per batch the FP32 forward runs as far as
    the chunk's jobs need (``torch_graph.BatchValues``), then each single-layer job reruns only the
    nodes after its layer."""

    CARRY_OUTPUT_BYTES = 32 << 20  # a batch's FP32 output kept for the next chunk up to this size

    def __init__(self, model: TorchModel, graph: TracedGraph) -> None:
        self.model, self.graph = model, graph

    def order(self, layer: str) -> int:
        """Jobs run in this order (ascending): the FP32 forward then only moves forward."""
        return self.graph.need[layer]

    def start(self, x, layers: list[str], carried: Carried | None = None) -> BatchValues:
        """The cache of one batch for jobs on ``layers`` (in ``order``), resuming from ``carried``."""
        return BatchValues(self.graph, x, layers, carried)

    def output(self, cache: BatchValues) -> torch.Tensor:
        """The batch's FP32 output (what the metric compares): kept from a previous chunk, or from a forward
        of its own that holds no value longer than the next node needs it (running the chunk's cache to the
        end instead would hold every value its jobs read at once)."""
        if cache.canon is None:
            if cache.output is None:
                cache.output = BatchValues(self.graph, cache.x, []).fp32_output()
            cache.canon = self.model._canon(cache.output)
        return cache.canon

    def carry(self, cache: BatchValues) -> Carried:
        """What the next chunk on the same batch resumes from (its FP32 output too, when small)."""
        y = self.output(cache)
        c = cache.carry(keep_output=False)
        if isinstance(y, torch.Tensor) and y.numel() * y.element_size() <= self.CARRY_OUTPUT_BYTES:
            c.output = cache.output
        return c

    def forward_all(self, x: torch.Tensor) -> tuple[object, list]:
        """The FP32 output of a batch and every node's value (checks and benchmarks; the sweep uses ``start``)."""
        env = self.graph.forward_all(x)
        return self.model._canon(self.graph.output(env)), env

    def rerun(self, cache, layer: str, fmt: str, x: torch.Tensor) -> tuple[object, torch.Tensor, torch.Tensor]:
        """Output with ``layer`` at ``fmt``, the layer's new output and its FP32 output."""
        if isinstance(cache, BatchValues):
            cache.ready(layer)
            with self.model.quantized({layer: fmt}):
                y, out = self.graph.rerun_values(cache, layer, x)
            ref = self.graph.layer_output(cache, layer)
            y = self.output(cache) if y is UNSET else self.model._canon(y)
            cache.done(layer)
            return y, out, ref
        with self.model.quantized({layer: fmt}):
            y, out = self.graph.rerun_from(cache, layer, x)
        return self.model._canon(y), out, self.graph.layer_output(cache, layer)

    def cost(self, layer: str) -> float:
        return self.graph.cost(layer)

    def reaches_output(self) -> dict[str, bool]:
        return {info.name: self.graph.reaches_output(info.name) for info in self.model.layers()}


def _sample_shapes(x):
    return sample_shapes(to_numpy(x))


def _check_argument_names(module: nn.Module, names: list[str], where: str) -> None:
    """Named task arrays must be arguments of ``forward`` (unless it takes ``**kwargs``)."""
    import inspect

    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    args = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for n in names:
        if n not in args:
            raise ModelError(f"{where}: the task's array '{n}' is not an argument of forward({', '.join(args)}); "
                             f"name the arrays after them (one input: 'inputs')")
    missing = [n for n, p in params.items() if n in args and p.default is p.empty and n not in names]
    if missing:
        raise ModelError(f"{where}: forward argument '{missing[0]}' is not in the task (it holds {', '.join(names)})")
