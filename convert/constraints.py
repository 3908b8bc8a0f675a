"""What a source model accepts beyond datatypes and shapes, read from its configuration, for the manifest.

Only limits the source itself defines are recorded (a Hugging Face config's `vocab_size`, its position count,
`type_vocab_size`, the 0/1 attention mask, inputs that pair with `input_ids` position by position); the server
checks them before queueing (service.validation) so a bad value is a 400 naming the input, not an engine fault.
A fixed image size needs nothing here: it is part of the input's shape already.
"""

from __future__ import annotations

from engines.manifest import InputConstraint

PAIRED = {  # inputs that carry one value per token of input_ids: (smallest, largest value or config attribute)
    "attention_mask": (0, 1),
    "token_type_ids": (0, "type_vocab_size"),
}


def input_constraints(source) -> list[InputConstraint]:
    """Constraints for `source`'s inputs (a convert.models.Source); [] when it has no HF-style config."""
    config = _config(source.model)
    names = {t.name for t in source.inputs}
    if config is None or "input_ids" not in names:
        return []
    found = [_token_ids(config)]
    for name, (low, high) in PAIRED.items():
        if name in names:
            top = getattr(config, high, None) if isinstance(high, str) else high + 1
            why = f"config.{high} = {top}" if isinstance(high, str) else f"{name} values are {low} or {high}"
            found.append(InputConstraint(name=name, same_shape_as="input_ids", min_value=low,
                                         max_value=None if top is None else int(top) - 1, source=why))
    return found


def _token_ids(config) -> InputConstraint:
    vocab = getattr(config, "vocab_size", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    why = [f"config.vocab_size = {vocab}"] if vocab else []
    if positions:
        why.append(f"{int(positions)} positions")
    return InputConstraint(name="input_ids", min_value=0, max_value=int(vocab) - 1 if vocab else None,
                           axis_min={1: 1}, axis_max={1: int(positions)} if positions else {},
                           source=", ".join(why + ["no empty sequence"]))


def _config(model):
    """The Hugging Face config of `model` or of the model it wraps (convert.models.hf.KeywordModel)."""
    for candidate in (model, getattr(model, "model", None)):
        config = getattr(candidate, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    return None
