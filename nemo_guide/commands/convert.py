"""``nemo-guide convert DIRECTION IN OUT``: Hugging Face <-> Megatron-core / ``.nemo`` checkpoints."""

from __future__ import annotations

import argparse


def run_convert(args: argparse.Namespace) -> int:
    from nemo_guide.cli import apply_threads
    from nemo_guide.convert.errors import ConvertError

    direction, nemo = args.direction, args.direction in ("hf-to-nemo", "nemo-to-hf")
    for flag, value, allowed in (("--tokenizer", args.tokenizer, ("hf-to-nemo",)), ("--hf-config", args.hf_config, ("megatron-to-hf", "nemo-to-hf")),
                                 ("--dtype auto", args.dtype == "auto" or None, ("hf-to-nemo", "nemo-to-hf"))):
        if value is not None and direction not in allowed:
            raise ConvertError(f"{flag} is an option of {' and '.join(allowed)}, not of {direction}")
    dtype = args.dtype or ("auto" if nemo else "bfloat16")
    try:
        from nemo_guide.backends.megatron import checkpoint as mcheckpoint, nemo_checkpoint
    except ImportError as exc:
        raise SystemExit(f"error: {exc}") from None
    apply_threads(args.threads, "cpu")  # conversion reshapes and casts tensors on CPU
    if direction == "hf-to-megatron":
        out = mcheckpoint.hf_to_megatron_checkpoint(args.input, args.output, dtype=dtype)
    elif direction == "megatron-to-hf":
        out = mcheckpoint.megatron_to_hf_checkpoint(args.input, args.output, hf_config=args.hf_config, dtype=dtype)
    elif direction == "hf-to-nemo":
        out = nemo_checkpoint.hf_to_nemo_checkpoint(args.input, args.output, dtype=dtype, tokenizer=args.tokenizer)
    else:
        out = nemo_checkpoint.nemo_to_hf_checkpoint(args.input, args.output, hf_config=args.hf_config, dtype=dtype)
    print(f"wrote {out}")
    return 0
