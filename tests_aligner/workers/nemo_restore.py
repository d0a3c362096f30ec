"""Worker: NeMo 2.1 restores ``.nemo`` files written by ``nemo-guide convert hf-to-nemo``.

Usage: ``nemo_restore.py OUT.json NEMO HF_DIR RESAVED TOKENIZER [NEMO HF_DIR RESAVED TOKENIZER ...]``.
For each file: ``MegatronGPTModel.restore_from(NEMO, trainer=...)`` on CPU at world size 1 (with
``tokenizer.type`` replaced by TOKENIZER through ``override_config_path`` unless it is ``-``), then the
restored weights against the Hugging Face ones (after the key map), the logits of a few tokens
against ``AutoModelForCausalLM``'s, and the tokenizer's ids against the HF tokenizer's; finally
NeMo's own ``save_to(RESAVED)``. Writes what it measured to OUT.json. (NeMo's writer is swapped for the package's synchronous one:
see the comment in :func:`main`.)
"""

import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nemo_env

TEXTS = ["the cat sat on the mat", "2 + 3 = 5, hello world!", "unseen wörds ☃ and <|endoftext|>"]


def main() -> None:
    t0 = time.perf_counter()
    trainer = nemo_env.start()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel

    from nemo.utils.callbacks.dist_ckpt_io import DistributedCheckpointIO

    from nemo_guide.backends.megatron.checkpoint import _save_strategy
    from nemo_guide.convert import load_hf_state_dict, megatron_to_hf, read_hf_shape

    # megatron-core 0.10's torch_dist writer calls a torch API whose signature changed in torch 2.7
    # (this stack has torch 2.13): NeMo's save_to writes the same format through the package's
    # synchronous writer instead.
    DistributedCheckpointIO._determine_dist_ckpt_save_strategy = lambda self: _save_strategy()

    results = {"start_s": time.perf_counter() - t0, "models": []}
    args = sys.argv[2:]
    for nemo_path, hf_dir, resaved, tokenizer in zip(args[0::4], args[1::4], args[2::4], args[3::4], strict=True):
        t = time.perf_counter()
        out = {"nemo": nemo_path}
        override = None
        if tokenizer != "-":
            override = MegatronGPTModel.restore_from(nemo_path, trainer=trainer, return_config=True)
            override.tokenizer.type = tokenizer
        model = MegatronGPTModel.restore_from(nemo_path, trainer=trainer, override_config_path=override)
        model.eval()
        out["restore_s"] = time.perf_counter() - t
        out["tokenizer_type"] = model.cfg.tokenizer.type
        shape, _ = read_hf_shape(hf_dir)
        mine = megatron_to_hf({k: v for k, v in model.model.state_dict().items() if isinstance(v, torch.Tensor)}, shape)
        ref = load_hf_state_dict(hf_dir)
        out["keys_equal"] = set(mine) == set(ref)
        out["unequal"] = sorted(k for k in ref if k not in mine or not torch.equal(mine[k], ref[k]))
        out["dtypes"] = sorted({str(v.dtype) for v in model.model.state_dict().values() if isinstance(v, torch.Tensor)})

        hf_tok = AutoTokenizer.from_pretrained(hf_dir)
        out["ids_equal"] = [model.tokenizer.text_to_ids(text) == hf_tok(text, add_special_tokens=False).input_ids for text in TEXTS]
        out["ids_example"] = model.tokenizer.text_to_ids(TEXTS[0])
        tokens = torch.tensor([hf_tok(TEXTS[1], add_special_tokens=False).input_ids])  # [1, s]
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model.model(tokens, positions, None)  # [1, s, V]
            expected = hf(tokens).logits
        out["logits_shape"] = list(logits.shape)
        out["logits_max_abs_diff"] = float((logits.float() - expected).abs().max())
        out["logits_max_abs"] = float(expected.abs().max())
        try:
            model.save_to(resaved)
            out["resaved"] = Path(resaved).is_file()
        except Exception:  # NeMo's own writer on CPU: recorded, the test decides
            out["resaved"] = False
            out["resave_error"] = traceback.format_exc()[-3000:]
        results["models"].append(out)
        del model
    Path(sys.argv[1]).write_text(json.dumps(results, indent=2))
    nemo_env.stop()


if __name__ == "__main__":  # NeMo's checkpoint writer starts processes that import this file
    main()
