"""Which layer each tensor belongs to, across architecture families, and the gradient position t it gets."""

from __future__ import annotations

import pytest

from evomerge.merging.layers import TensorPlace, layout, place_of, renumber


@pytest.mark.parametrize(
    ("name", "layer", "prefix"),
    [
        ("model.layers.3.self_attn.q_proj.weight", 3, "model.layers.3."),  # Llama / Mistral
        ("model.layers.12.mlp.down_proj.weight", 12, "model.layers.12."),
        ("transformer.h.2.attn.c_attn.weight", 2, "transformer.h.2."),  # GPT-2
        ("transformer.h.0.ln_1.bias", 0, "transformer.h.0."),
        ("gpt_neox.layers.1.attention.query_key_value.weight", 1, "gpt_neox.layers.1."),  # GPT-NeoX / Pythia
        ("bert.encoder.layer.0.attention.self.query.weight", 0, "bert.encoder.layer.0."),  # BERT
        ("roberta.encoder.layer.11.output.dense.bias", 11, "roberta.encoder.layer.11."),
        ("model.layers.5.self_attn.dense.weight", 5, "model.layers.5."),  # Phi-2
        ("model.layers.7.self_attn.q_proj.bias", 7, "model.layers.7."),  # Qwen2
        ("model.layers.0.pre_feedforward_layernorm.weight", 0, "model.layers.0."),  # Gemma 2
        ("model.layers.2.self_attn.qkv_proj.weight", 2, "model.layers.2."),  # Phi-3
        ("transformer.h.4.self_attention.query_key_value.weight", 4, "transformer.h.4."),  # Falcon
        ("model.decoder.layers.1.fc1.weight", 1, "model.decoder.layers.1."),  # OPT
        ("backbone.layers.3.mixer.A_log", 3, "backbone.layers.3."),  # Mamba
        ("language_model.model.layers.2.mlp.up_proj.weight", 2, "language_model.model.layers.2."),  # LLaVA
    ],
)
def test_place_of_layer_tensors(name: str, layer: int, prefix: str) -> None:
    place = place_of(name)
    assert place == TensorPlace("layer", layer, prefix)


@pytest.mark.parametrize(
    ("name", "group"),
    [
        ("model.embed_tokens.weight", "pre"),  # Llama, Qwen2, Gemma, Phi
        ("transformer.wte.weight", "pre"),  # GPT-2
        ("transformer.wpe.weight", "pre"),
        ("gpt_neox.embed_in.weight", "pre"),
        ("bert.embeddings.word_embeddings.weight", "pre"),
        ("bert.embeddings.position_embeddings.weight", "pre"),
        ("bert.embeddings.token_type_embeddings.weight", "pre"),
        ("bert.embeddings.LayerNorm.weight", "pre"),
        ("transformer.word_embeddings.weight", "pre"),  # Falcon
        ("model.tok_embeddings.weight", "pre"),  # InternLM2
        ("model.norm.weight", "post"),
        ("lm_head.weight", "post"),
        ("transformer.ln_f.bias", "post"),
        ("gpt_neox.final_layer_norm.weight", "post"),
        ("embed_out.weight", "post"),  # GPT-NeoX's output head (mergekit's gpt-neox.json: a post weight)
        ("model.final_layernorm.weight", "post"),  # Phi-2
        ("bert.pooler.dense.weight", "post"),
        ("classifier.weight", "post"),
        ("score.weight", "post"),
    ],
)
def test_place_of_tensors_outside_the_blocks(name: str, group: str) -> None:
    place = place_of(name)
    assert (place.group, place.layer, place.prefix) == (group, None, None)


def test_layout_of_a_llama_model_and_t_positions() -> None:
    names = ["model.embed_tokens.weight"] + [
        f"model.layers.{i}.{t}" for i in range(4) for t in ("self_attn.q_proj.weight", "mlp.up_proj.weight")
    ] + ["model.norm.weight", "lm_head.weight"]
    lay = layout(names)
    assert lay.num_layers == 4
    assert lay.layer_tensors(2) == ["model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"]
    # layer i of L sits at t = i / (L − 1); tensors outside the blocks at 0
    assert [lay.places[f"model.layers.{i}.mlp.up_proj.weight"].t(4) for i in range(4)] == pytest.approx(
        [0.0, 1 / 3, 2 / 3, 1.0])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert lay.places[name].t(4) == 0.0
    assert lay.places["model.embed_tokens.weight"].group == "pre"
    assert lay.places["lm_head.weight"].group == "post"


def test_t_of_a_single_layer_is_one_as_in_mergekit() -> None:
    # mergekit's plan_slice: t = idx / (n − 1), and t = 1 when a slice has one layer
    assert TensorPlace("layer", 0, "h.0.").t(1) == 1.0


def test_layout_num_layers_from_config_and_groups() -> None:
    names = [f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)] + ["transformer.wte.weight"]
    assert layout(names).num_layers == 3
    # The config may declare more layers than the names show (a partial state dict): config wins.
    assert layout(names, {"n_layer": 6}).num_layers == 6
    lay = layout([f"model.layers.{i}.x.weight" for i in range(4)] + ["model.norm.weight"], {"num_hidden_layers": 4})
    # 4 layers in 2 groups: 0, 1 → layers.0; 2, 3 → layers.1
    assert [lay.group_of(f"model.layers.{i}.x.weight", 2) for i in range(4)] == [
        "layers.0", "layers.0", "layers.1", "layers.1"]
    assert lay.group_of("model.norm.weight", 2) == "post"


def test_layout_of_a_plain_sequential_mlp() -> None:
    # Linear(64, 256) -> ReLU -> Linear(256, 10): modules 0 and 2 hold weights, they are layers 0 and 1
    lay = layout(["0.weight", "0.bias", "2.weight", "2.bias"])
    assert lay.num_layers == 2
    assert lay.places["0.weight"].layer == 0 and lay.places["0.bias"].layer == 0
    assert lay.places["2.weight"].layer == 1 and lay.places["2.bias"].layer == 1
    assert lay.places["2.bias"].t(2) == 1.0
    assert lay.layer_tensors(1) == ["2.weight", "2.bias"]


def test_layout_mixed_names_without_blocks_has_no_layers() -> None:
    lay = layout(["0.weight", "head.weight"])
    assert lay.num_layers == 0
    assert all(p.layer is None for p in lay.places.values())


def test_renumber_moves_a_tensor_to_another_block() -> None:
    name = "model.layers.3.mlp.up_proj.weight"
    assert renumber(name, place_of(name), 0) == "model.layers.0.mlp.up_proj.weight"
    assert renumber(name, place_of(name), 11) == "model.layers.11.mlp.up_proj.weight"
    name = "transformer.h.12.attn.c_attn.weight"
    assert renumber(name, place_of(name), 3) == "transformer.h.3.attn.c_attn.weight"
    name = "bert.encoder.layer.0.output.dense.bias"
    assert renumber(name, place_of(name), 5) == "bert.encoder.layer.5.output.dense.bias"
    # Only the block index changes, even when the same digits occur later in the name.
    name = "model.layers.1.mlp.experts.1.w1.weight"
    assert renumber(name, place_of(name), 4) == "model.layers.4.mlp.experts.1.w1.weight"
    # Tensors outside the blocks keep their names.
    assert renumber("lm_head.weight", place_of("lm_head.weight"), 2) == "lm_head.weight"


def test_renumber_sequential_layers_with_multi_digit_indices() -> None:
    # Linear modules at 0, 2, ..., 10: "10.weight" is layer 5. Moving it must replace the whole index.
    names = [f"{i}.weight" for i in range(0, 12, 2)]
    lay = layout(names)
    assert lay.places["10.weight"].layer == 5
    moved = renumber("10.weight", lay.places["10.weight"], 0)
    assert moved == "0.weight"
    assert renumber("4.weight", lay.places["4.weight"], 1) == "1.weight"
