"""Megatron-core on CPU under real gloo process groups (megatron-core 0.10.0 + the
test-side shims of ``megatron_cpu.py``), driven by the host harness of
``megatron_schedule.py`` over the package's reusable pieces: ``model.hidden_states`` and
``output_weight``, ``layout`` and ``last_stage.response_logprobs``.

For a tiny Qwen2 (tied embeddings, QKV bias, GQA) and a tiny Llama (untied, head_dim !=
hidden/heads, Llama 3.1 RoPE scaling), built from configs here, every layout (TP=1,
TP=2, PP=2) must give, against a token-by-token Hugging Face reference:
- the logits of the same tokens (TP shards concatenated);
- response log-probs and entropies behind the plain and the sampling prompt, the
  sampling-prompt ones also computed as NeMo-Aligner does (``[b, s-1]`` log-probs from the
  vocab-parallel logits) and realigned to ``[N, L]`` by ``layout.realign``;
- the gradients of the real Guide-GRPO loss (guided tokens unclipped, clipped plain tokens,
  entropy bonus), mapped back to Hugging Face names, with several micro-batches (1F1B at PP=2).
Equal to HF implies TP=2 == TP=1 and PP=2 == PP=1; the tests also compare them directly.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

import megatron_cpu
import megatron_models as mm

from nemo_guide.convert import megatron_to_hf, merge_pipeline_stages, read_hf_shape, unshard_tp

pytestmark = pytest.mark.multiprocess
MICRO = 3  # 7 rollouts -> 3 micro-batches, the last one padded with an empty row
LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """family -> (model_dir, batch with old log-probs, HF reference)."""
    out = {}
    for family in mm.FAMILIES:
        path = tmp_path_factory.mktemp(f"hf_{family}")
        mm.save_hf_model(family, path)
        batch = mm.make_batch()
        ref = mm.hf_reference(path, batch)
        out[family] = (str(path), mm.with_old_logprobs(batch, ref[2]), ref)
    return out


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """layout -> per-rank results of :func:`megatron_models.worker` (one spawn per layout)."""
    inputs = {family: (d, batch) for family, (d, batch, _) in setup.items()}
    results = {}
    for name, (tp, pp) in LAYOUTS.items():
        results[name] = megatron_cpu.run_parallel(mm.worker, tp * pp, tp, pp, (inputs, MICRO), tmp_path_factory.mktemp(name))
    return results


def full_grads(layout: str, ranks: list[dict], family: str, shape) -> dict[str, torch.Tensor]:
    """This layout's gradients as one unsharded Megatron state dict."""
    if layout == "tp2":
        return unshard_tp([r[family]["grads"] for r in sorted(ranks, key=lambda r: r["tp_rank"])])
    if layout == "pp2":
        return merge_pipeline_stages([r[family]["grads"] for r in sorted(ranks, key=lambda r: r["pp_rank"])], shape)
    return ranks[0][family]["grads"]


@pytest.mark.parametrize("family", mm.FAMILIES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logprobs_match_hf_on_every_rank(setup, runs, layout, family):
    _, batch, (lp_plain, ent_plain, lp_sample, *_rest) = setup[family]
    for rank in runs[layout]:
        got = rank[family]
        torch.testing.assert_close(got["lp_plain"], lp_plain, atol=2e-5, rtol=0)
        torch.testing.assert_close(got["ent_plain"], ent_plain, atol=2e-5, rtol=0)
        torch.testing.assert_close(got["lp_sample"], lp_sample, atol=2e-5, rtol=0)
        torch.testing.assert_close(got["lp_sample_aligner"], lp_sample, atol=2e-5, rtol=0)
        # guided rollouts really were scored behind a different prompt
        assert (got["lp_sample"][4:] - got["lp_plain"][4:]).abs().max() > 1e-2
        assert torch.equal(got["lp_plain"][:4], got["lp_sample"][:4])
        # zero outside the responses
        lengths = torch.tensor([len(o) for o in batch.response_ids])
        outside = torch.arange(batch.response_length)[None, :] >= lengths[:, None]
        assert got["lp_plain"][outside].abs().max() == 0


@pytest.mark.parametrize("family", mm.FAMILIES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_match_hf(setup, runs, layout, family):
    model_dir, _, (*_lps, loss, metrics, hf_grads) = setup[family]
    shape, _ = read_hf_shape(model_dir)
    grads = megatron_to_hf(full_grads(layout, runs[layout], family, shape), shape)
    assert set(grads) == set(hf_grads)
    for key, expected in hf_grads.items():
        torch.testing.assert_close(grads[key], expected, atol=1e-6, rtol=1e-4, msg=key)
    assert any(g.abs().max() > 1e-4 for g in grads.values())
    m = runs[layout][0][family]["metrics"]
    assert m == runs[layout][-1][family]["metrics"]  # broadcast from the last stage
    assert m["guided/clip_frac"] == 0.0 and m["plain/clip_frac"] > 0  # guided tokens unclipped, plain ones clipped


@pytest.mark.parametrize("family", mm.FAMILIES)
def test_tp2_and_pp2_equal_tp1(setup, runs, family):
    model_dir, *_ = setup[family]
    shape, _ = read_hf_shape(model_dir)
    base = runs["tp1"][0][family]
    for layout in ("tp2", "pp2"):
        got = runs[layout][-1][family]
        torch.testing.assert_close(got["lp_plain"], base["lp_plain"], atol=2e-6, rtol=0)
        torch.testing.assert_close(got["lp_sample"], base["lp_sample"], atol=2e-6, rtol=0)
        grads = full_grads(layout, runs[layout], family, shape)
        for key, expected in base["grads"].items():
            torch.testing.assert_close(grads[key], expected, atol=1e-6, rtol=1e-4, msg=f"{layout} {key}")
        for key, value in base["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, abs=1e-5), key


@pytest.mark.parametrize("family", mm.FAMILIES)
def test_logits_equal_hf(setup, runs, family):
    from transformers import AutoModelForCausalLM

    model_dir, batch, _ = setup[family]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokens = torch.tensor([batch.plain_prompt_ids[1] + batch.response_ids[1]])
    with torch.no_grad():
        expected = hf(tokens).logits[0]  # [s, V]
    torch.testing.assert_close(runs["tp1"][0][family]["logits"], expected, atol=2e-5, rtol=0)
    shards = [r[family]["logits"] for r in sorted(runs["tp2"], key=lambda r: r["tp_rank"])]
    torch.testing.assert_close(torch.cat(shards, dim=-1), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", mm.FAMILIES)
def test_convert_cli_round_trip_through_other_layouts(setup, tmp_path, family):
    """HF -> distributed checkpoint (CLI, one process) -> loaded at TP=2 and at PP=2, scored,
    saved again by those layouts -> HF (CLI): bit-exact, and the log-probs equal HF's."""
    from nemo_guide.cli import main
    from nemo_guide.convert import load_hf_state_dict

    model_dir, batch, (_, _, lp_sample, *_r) = setup[family]
    ckpt = tmp_path / "mcore"
    assert main(["convert", "hf-to-megatron", model_dir, str(ckpt), "--dtype", "float32"]) == 0
    assert (ckpt / "metadata.json").is_file() and (ckpt / "hf_config.json").is_file()
    original = load_hf_state_dict(model_dir)
    for name, (tp, pp) in (("tp2", (2, 1)), ("pp2", (1, 2))):
        resaved = tmp_path / f"mcore_{name}"
        lps = megatron_cpu.run_parallel(mm.dist_checkpoint_worker, 2, tp, pp, (str(ckpt), str(resaved), batch), tmp_path / f"w_{name}")
        for lp in lps:
            torch.testing.assert_close(lp, lp_sample, atol=2e-5, rtol=0)
        (resaved / "hf_config.json").write_text((ckpt / "hf_config.json").read_text())
        back = tmp_path / f"hf_{name}"
        assert main(["convert", "megatron-to-hf", str(resaved), str(back), "--dtype", "float32"]) == 0
        restored = load_hf_state_dict(back)
        assert set(restored) == set(original)
        for key, value in original.items():
            assert torch.equal(restored[key], value), key
    # never overwrites
    assert main(["convert", "megatron-to-hf", str(ckpt), str(back)]) == 2


@pytest.mark.gpu
def test_gpu_logprobs_and_gradients_match_hf(setup, tmp_path):
    """On a GPU machine: NCCL, the TransformerEngine layer spec when installed, TP over up
    to 2 GPUs; float32 weights, so the tolerance only allows for TF32/fused-kernel rounding."""
    tp = min(2, torch.cuda.device_count())
    inputs = {family: (d, batch) for family, (d, batch, _) in setup.items()}
    ranks = megatron_cpu.run_parallel(mm.worker, tp, tp, 1, (inputs, MICRO, "auto"), tmp_path, cuda=True)
    for family, (model_dir, _, (lp_plain, ent_plain, lp_sample, _loss, _m, hf_grads)) in setup.items():
        shape, _ = read_hf_shape(model_dir)
        got = ranks[-1][family]
        torch.testing.assert_close(got["lp_plain"], lp_plain, atol=5e-3, rtol=0)
        torch.testing.assert_close(got["lp_sample"], lp_sample, atol=5e-3, rtol=0)
        torch.testing.assert_close(got["lp_sample_aligner"], lp_sample, atol=5e-3, rtol=0)
        torch.testing.assert_close(got["ent_plain"], ent_plain, atol=5e-3, rtol=0)
        grads = megatron_to_hf(full_grads("tp2" if tp == 2 else "tp1", ranks, family, shape), shape)
        for key, expected in hf_grads.items():
            torch.testing.assert_close(grads[key], expected, atol=1e-3, rtol=5e-2, msg=key)


def test_initialize_parallel_refuses_sizes_that_do_not_split_the_world(monkeypatch):
    import torch.distributed as dist

    from nemo_guide.backends.megatron.model import initialize_parallel

    with pytest.raises(RuntimeError, match="not initialised"):
        initialize_parallel(1, 1)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(megatron_cpu.free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match=r"backend.tensor_parallel=2 x backend.pipeline_parallel=1"):
            initialize_parallel(2, 1)
    finally:
        dist.destroy_process_group()

