"""convert.constraints reads the limits a Hugging Face source defines into the manifest's constraints."""

import torch

from convert.constraints import input_constraints
from convert.models.hf import load_hf_directory


def save(directory, config_class, model_class, **config):
    torch.manual_seed(0)
    model_class(config_class(**config)).save_pretrained(directory, safe_serialization=True)
    return load_hf_directory(directory)


def test_gpt2_token_ids_positions_and_mask(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    source = save(tmp_path / "gpt2", GPT2Config, GPT2LMHeadModel, n_layer=1, n_embd=16, n_head=2, vocab_size=97,
                  n_positions=48)
    ids, mask = input_constraints(source)
    assert (ids.name, ids.min_value, ids.max_value, ids.axis_min, ids.axis_max) == ("input_ids", 0, 96, {1: 1},
                                                                                     {1: 48})
    assert "vocab_size = 97" in ids.source and "48 positions" in ids.source
    assert (mask.name, mask.same_shape_as, mask.min_value, mask.max_value) == ("attention_mask", "input_ids", 0, 1)


def test_bert_positions_come_from_max_position_embeddings(tmp_path):
    from transformers import BertConfig, BertModel

    source = save(tmp_path / "bert", BertConfig, BertModel, num_hidden_layers=1, hidden_size=16,
                  num_attention_heads=2, intermediate_size=32, vocab_size=50, max_position_embeddings=40)
    by_name = {c.name: c for c in input_constraints(source)}
    assert by_name["input_ids"].max_value == 49 and by_name["input_ids"].axis_max == {1: 40}


def test_a_source_without_a_config_records_nothing():
    from convert.models import Source
    from engines.manifest import TensorInfo

    source = Source(name="m", description="", model=torch.nn.Linear(2, 2), task="",
                    inputs=[TensorInfo(name="x", datatype="FP32", shape=[-1, 2])],
                    outputs=[TensorInfo(name="y", datatype="FP32", shape=[-1, 2])])
    assert input_constraints(source) == []
