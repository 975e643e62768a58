#!/usr/bin/env python
"""Decode throughput and memory: BASED (recurrent) vs Transformer++ (KV cache) vs HF Llama (KV cache).

Same parameter count, same machine, one run, fixed seed, random weights. For each prompt length
and batch size every model prefills the prompt once and then generates ``--new-tokens`` tokens
greedily; the table gives decode tokens/s (prefill excluded), the peak extra resident memory of
the whole call (prefill included), the bytes of decode state held at the end (recurrent state or KV
cache), and the decode speed of BASED relative to the two KV-cache models.

    python benchmarks/generate.py                    # prompts 512/2048/8192, batch 1 and 16
    python benchmarks/generate.py --quick            # a smaller sweep for a quick look

The HF Llama peer needs the `hf` extra (transformers); it is skipped when that is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from linmix.lm import BasedForCausalLM, preset
from linmix.lm.baselines import parameter_matched_transformer
from linmix.utils.memory import peak_memory_mib, pin_malloc_threshold

VOCAB = 50257


def build_models(d_model: int, n_layer: int):
    """BASED and a Transformer++ with the MLP width chosen to match BASED's parameter count."""
    torch.manual_seed(0)
    heads = max(1, d_model // 64)
    based_config = preset("based-small", d_model=d_model, n_layer=n_layer, mlp_hidden=2 * d_model, vocab_size=VOCAB,
                          linear_attention_heads=heads, num_heads=heads, window=64,
                          layer_types=preset("based-small").layer_types[:n_layer])
    based = BasedForCausalLM(based_config).eval()
    transformer = BasedForCausalLM(parameter_matched_transformer(based_config, multiple_of=32)).eval()
    llama = None
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        llama_config = LlamaConfig(vocab_size=based_config.padded_vocab_size, hidden_size=d_model,
                                   intermediate_size=transformer.config.mlp_hidden, num_hidden_layers=n_layer,
                                   num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=1 << 16, tie_word_embeddings=True)
        llama = LlamaForCausalLM(llama_config).eval()
    except ImportError:
        print("transformers not installed: skipping the HF Llama peer", file=sys.stderr)
    return {"BASED": based, "Transformer++": transformer, "HF Llama": llama}


def run_linmix(model, prompt, new_tokens, max_seconds):
    """Returns (prefill s, decode s, decode steps done, state bytes)."""
    with torch.no_grad():
        start = time.perf_counter()
        out = model(prompt, return_state=True, logits_to_keep=1)
        token, state = out.logits[:, -1].argmax(-1), out.state
        prefill = time.perf_counter() - start
        steps = 0
        decode_start = time.perf_counter()
        while steps < new_tokens - 1 and time.perf_counter() - decode_start < max_seconds:
            logits, state = model.step(token, state)
            token = logits.argmax(-1)
            steps += 1
        decode = time.perf_counter() - decode_start
    return prefill, decode, steps, state.nbytes()


def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of all tensors reachable from a transformers cache object (keys and values)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(item, seen) for item in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(item, seen) for item in obj.values())
    if hasattr(obj, "__dict__"):
        return sum(_tensor_bytes(item, seen) for item in vars(obj).values())
    return 0


def run_llama(model, prompt, new_tokens, max_seconds):
    """Returns (prefill s, decode s, decode steps done, KV-cache bytes); the prefill is timed on
    its own and subtracted from the generate call."""
    with torch.no_grad():
        start = time.perf_counter()
        model(prompt, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True, max_time=prefill + max_seconds)
        total = time.perf_counter() - start
    steps = out.sequences.shape[1] - prompt.shape[1] - 1
    return prefill, max(total - prefill, 1e-9), steps, _tensor_bytes(out.past_key_values)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="prompts 256/1024, 128 new tokens")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=90.0,
                        help="stop a decode run after this long and rate the steps done (CPU time budget)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    pin_malloc_threshold()
    prompts = [256, 1024] if args.quick else [512, 2048, 8192]
    batches = [1, 16]
    new_tokens = args.new_tokens or (128 if args.quick else 1024)
    models = build_models(args.d_model, args.n_layer)
    counts = {name: (m.num_parameters() if name != "HF Llama" else sum(p.numel() for p in m.parameters()))
              for name, m in models.items() if m is not None}
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()), flush=True)
    rows = []
    for batch in batches:
        for length in prompts:
            prompt = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(length))
            row = {"batch": batch, "prompt": length, "new_tokens": new_tokens}
            for name, model in models.items():
                if model is None:
                    continue
                runner = run_llama if name == "HF Llama" else run_linmix
                (prefill, decode, steps, state_bytes), peak = peak_memory_mib(
                    lambda: runner(model, prompt, new_tokens, args.max_seconds))
                row[name] = {"decode_tokens_per_s": batch * steps / decode, "prefill_s": prefill, "decode_steps": steps,
                             "peak_mib": peak, "state_bytes": state_bytes}
                print(f"  B={batch} prompt={length} {name}: {row[name]['decode_tokens_per_s']:.0f} tok/s decode, "
                      f"peak {peak if peak is None else round(peak)} MiB", flush=True)
            rows.append(row)
    lines = [f"Random weights, greedy, up to {new_tokens} new tokens (a decode run stops after {args.max_seconds:.0f} s "
             f"and is rated on the steps it did); d_model {args.d_model}, {args.n_layer} layers; "
             + ", ".join(f"{k} {v / 1e6:.2f}M params" for k, v in counts.items()) + f"; {torch.get_num_threads()} threads", "",
             "| batch | prompt | BASED tok/s | Transformer++ tok/s | HF Llama tok/s | BASED / Transformer++ | BASED / HF Llama "
             "| decode state: BASED | Transformer++ | HF Llama | peak RSS: BASED | Transformer++ | HF Llama |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        def cell(name, key, fmt):
            entry = row.get(name)
            return "—" if entry is None or entry[key] is None else fmt(entry[key])

        def ratio(other):
            if other not in row:
                return "—"
            return f"**{row['BASED']['decode_tokens_per_s'] / row[other]['decode_tokens_per_s']:.2f}x**"

        tps = lambda v: f"{v:.0f}"  # noqa: E731
        mib = lambda v: f"{v:.0f} MiB"  # noqa: E731
        state = lambda v: f"{v / 2**20:.1f} MiB"  # noqa: E731
        lines.append(f"| {row['batch']} | {row['prompt']} | {cell('BASED', 'decode_tokens_per_s', tps)} | "
                     f"{cell('Transformer++', 'decode_tokens_per_s', tps)} | {cell('HF Llama', 'decode_tokens_per_s', tps)} | "
                     f"{ratio('Transformer++')} | {ratio('HF Llama')} | {cell('BASED', 'state_bytes', state)} | "
                     f"{cell('Transformer++', 'state_bytes', state)} | {cell('HF Llama', 'state_bytes', state)} | "
                     f"{cell('BASED', 'peak_mib', mib)} | {cell('Transformer++', 'peak_mib', mib)} | {cell('HF Llama', 'peak_mib', mib)} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"command": "python benchmarks/generate.py" + (" --quick" if args.quick else ""),
                                         "max_seconds": args.max_seconds, "rows": rows, "parameters": counts}, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
