"""lm-evaluation-harness (0.4.x) adapter: ``lm_eval --model linmix --model_args pretrained=DIR``.

``DIR`` is a model folder from ``linmix lm train`` (config.json, model.safetensors and its
tokenizer) or any ``save_pretrained`` folder plus ``tokenizer=PATH``. Model arguments:
``pretrained``, ``tokenizer`` (default: the one in DIR, else byte-level), ``device`` (cpu),
``batch_size`` (8), ``max_length`` (2048: contexts are left-truncated to it), ``max_gen_toks``
(256), ``dtype`` (float32 | bfloat16).

How the name is found: lm-eval 0.4.13 has no plug-in discovery for models; it fills its registry
from a fixed table when ``lm_eval.models`` is first imported. linmix adds one line to that registry
right after that import (a lazy ``"linmix" -> "linmix.lm.lm_eval_adapter:LinmixLM"`` placeholder),
from the import hook :mod:`linmix._lm_eval_hook`, which a one-line ``linmix_lm_eval.pth`` in
site-packages activates (``make install`` and ``linmix lm install-lm-eval-hook`` write it).
In Python code, :func:`register` does the same directly.

The recall tasks (``text`` / ``value`` files) run as lm-eval tasks too: :func:`write_recall_task`
writes a task YAML for ``lm_eval --include_path DIR --tasks NAME``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

MODEL_NAME = "linmix"
ADAPTER_TARGET = "linmix.lm.lm_eval_adapter:LinmixLM"


def register() -> None:
    """Register the ``linmix`` model name in lm-eval's registry (idempotent)."""
    import lm_eval.models  # noqa: F401  (fills the registry first, so get_model keeps every model)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=ADAPTER_TARGET)


def install_hook(site_dir: str | Path | None = None) -> Path:
    """Write ``linmix_lm_eval.pth`` into ``site_dir`` (default: this environment's site-packages) so
    every interpreter of the environment installs the import hook; returns its path."""
    from linmix._lm_eval_hook import write_pth

    return write_pth(site_dir)


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "auto": None}
    if str(dtype) not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[str(dtype)]


def _available_device(device: str | None) -> str:
    """lm-eval passes its default ``cuda:0`` even on CPU-only machines: fall back to the CPU there
    (with a warning, as lm-eval's own Hugging Face model does)."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        import warnings

        warnings.warn(f"device {device!r} requested but CUDA is not available; running on the CPU", stacklevel=3)
        return "cpu"
    return str(device)


def _lm_base():
    from lm_eval.api.model import TemplateLM

    return TemplateLM


class LinmixLM(_lm_base()):
    """lm-eval model over :class:`linmix.lm.BasedForCausalLM` (loglikelihood, rolling, generation)."""

    def __init__(self, pretrained: str, tokenizer: str | None = None, device: str = "cpu", batch_size=8,
                 max_length: int = 2048, max_gen_toks: int = 256, dtype=None, **unused):
        super().__init__()
        from linmix.lm.evaluate import load_model
        from linmix.lm.tokenizers import BYTE_TOKENIZER_FILE, load_tokenizer

        directory = Path(pretrained)
        device = _available_device(device)
        self.model = load_model(directory, device=device, dtype=_resolve_dtype(dtype))
        if tokenizer is None:
            has_own = any((directory / name).is_file() for name in ("tokenizer.json", "vocab.json", BYTE_TOKENIZER_FILE))
            tokenizer = directory if has_own else None
        self.tok = load_tokenizer(tokenizer)
        if self.tok.vocab_size > self.model.config.vocab_size:
            raise ValueError(f"tokenizer has {self.tok.vocab_size} tokens, the model only {self.model.config.vocab_size}")
        self._device = torch.device(device)
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)  # "auto" / "auto:N": a fixed 8
        self.max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.unused_args = unused  # lm-eval passes e.g. max_batch_size; nothing here needs it

    # -- tokenizer -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.tok.name)

    @property
    def device(self):
        return self._device

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    # -- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, inputs: list[list[int]], targets_len: list[int]) -> list[tuple[float, bool, list[float]]]:
        """For each row: (sum of log p of its last ``targets_len`` tokens given the earlier ones,
        whether greedy decoding would produce them). Rows are right-padded into one batch."""
        width = max(len(x) for x in inputs)
        ids = torch.zeros((len(inputs), width), dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens)
        # Causal model: right padding never affects earlier positions.
        logits = self.model(ids.to(self._device)).logits.float()
        log_probs = F.log_softmax(logits, dim=-1)
        results = []
        for row, tokens in enumerate(inputs):
            n, length = targets_len[row], len(tokens)
            # logits at position t predict token t + 1
            pred = log_probs[row, length - n - 1 : length - 1]
            target = torch.tensor(tokens[length - n :], device=pred.device)
            picked = pred.gather(-1, target[:, None]).squeeze(-1)
            greedy = bool((pred.argmax(-1) == target).all())
            results.append((float(picked.sum()), greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        prepared = []
        for _, context_enc, continuation_enc in requests:
            if not continuation_enc:
                raise ValueError("empty continuation in a loglikelihood request")
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            # the model sees all but the last token; the continuation must keep >= 1 context token
            n = min(len(continuation_enc), len(whole) - 1)
            prepared.append((whole, n))
        order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
        results: list = [None] * len(prepared)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="linmix loglikelihood"):
            rows = order[start : start + self.batch_size]
            scored = self._score([prepared[i][0] for i in rows], [prepared[i][1] for i in rows])
            for i, value in zip(rows, scored):
                results[i] = value
                if self.cache_hook is not None and requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], value)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for (string,) in [req.args for req in requests]:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.eot_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(value for value, _ in scored)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (sampling when ``do_sample``), cut at the first stop string; contexts
        left-truncated to ``max_length - max_gen_toks``. Requests with the same generation
        arguments run ``batch_size`` at a time, left-padded (each row generates what it would alone)."""
        from tqdm.auto import tqdm

        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1] or {}, sort_keys=True, default=str), []).append(index)
        outputs: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="linmix generate")
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1] or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
            for start in range(0, len(indices), self.batch_size):
                rows = indices[start : start + self.batch_size]
                contexts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] or [self.eot_token_id]
                            for i in rows]
                width = max(len(c) for c in contexts)
                ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, context_ids in enumerate(contexts):
                    ids[row, width - len(context_ids) :] = torch.tensor(context_ids)
                    mask[row, width - len(context_ids) :] = 1
                generated = self.model.generate(ids.to(self._device), max_new, temperature=temperature,
                                                eos_token_id=self.eot_token_id, attention_mask=mask.to(self._device),
                                                top_k=gen_kwargs.get("top_k"), top_p=gen_kwargs.get("top_p"))
                for row, i in enumerate(rows):
                    text = self.tok_decode(generated[row, width:].tolist())
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(rows))
        bar.close()
        return outputs


def write_recall_task(data_file: str | Path, name: str, out_dir: str | Path) -> Path:
    """A task YAML running a local recall file (fields ``text``, ``value``) the BASED paper's way:
    zero-shot, greedy, stop at newline, 48 new tokens, "contains" metric. Returns the YAML path."""
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise FileNotFoundError(f"no recall task file at {data_file}")
    builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(data_file.suffix)
    if builder is None:
        raise ValueError(f"recall task file must be .jsonl or .parquet, got {data_file}")
    if not name.replace("_", "").isalnum():
        raise ValueError(f"task name must be letters, digits and underscores, got {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "linmix_recall_metrics.py").write_text(
        '"""Metric of the BASED recall tasks: the gold value occurs in the generation, ignoring case."""\n\n\n'
        "def contains(references, predictions, **kwargs):\n"
        "    golds = references[0] if isinstance(references[0], list) else [references[0]]\n"
        "    prediction = predictions[0].lower()\n"
        "    return float(any(str(g).lower().strip() in prediction for g in golds if str(g).strip()))\n"
    )
    yaml_path = out_dir / f"{name}.yaml"
    yaml_path.write_text(
        f"task: {name}\n"
        f"dataset_path: {builder}\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {json.dumps(str(data_file))}\n"  # JSON strings are YAML
        "validation_split: validation\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{text}}"\n'
        'doc_to_target: "{{value}}"\n'
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 48\n  do_sample: false\n"
        "metric_list:\n  - metric: !function linmix_recall_metrics.contains\n"
        "    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return yaml_path

