"""Translation models trained here: Marian-shaped encoder-decoders, their loss and training.

`marian_config` describes a Marian (OPUS-MT) transformer of any size over a joint
vocabulary (post-LayerNorm blocks, sinusoidal positions, embeddings scaled by
sqrt(d_model), SiLU MLPs, `final_logits_bias`, tied embeddings, decoder starting from
`<pad>`); `init_params` draws its weights. `translation_loss` is teacher-forced cross
entropy on batches of `seq2seq.data.encode_translation_pairs`, and `train_translation`
runs the shared training loop with it (meshes, gradient accumulation, Orbax checkpoints
that resume exactly), for training from scratch and for finetuning any loaded
encoder-decoder (T5, BART, Marian) alike. `save_translation_model` writes a Hugging Face
folder (`config.json`, `model.safetensors`, `tokenizer.json`) that `mm.load`,
`mm.load_tokenizer` and `transformers.MarianMTModel` all read.

Example:
    >>> cfg = marian_config(vocab_size=100, pad_id=0, eos_id=1, d_model=32, layers=2, heads=4, ffn=64)
    >>> cfg.family, cfg.encoder.n_layers, cfg.decoder_start_token_id
    ('marian', 2, 0)
"""

from __future__ import annotations

import jax.numpy as jnp

from makemost_jax import models, training
from makemost_jax.checkpoints.export import save_hf
from makemost_jax.errors import ConfigError, InputError
from makemost_jax.models.config import ModelConfig, from_hf_config
from makemost_jax.models.types import Params
from makemost_jax.seq2seq.data import save_tokenizer


def marian_config(vocab_size: int, *, pad_id: int, eos_id: int, d_model: int = 256, layers: int = 3,
                  decoder_layers: int | None = None, heads: int = 4, ffn: int = 1024,
                  max_positions: int = 256) -> ModelConfig:
    """A Marian-shaped encoder-decoder over one joint vocabulary.

    Example:
        >>> marian_config(8000, pad_id=0, eos_id=1).d_model
        256
    """
    if d_model % heads:
        raise ConfigError(f"d_model={d_model} is not a multiple of heads={heads}")
    return from_hf_config({
        "model_type": "marian", "vocab_size": vocab_size, "d_model": d_model, "encoder_layers": layers,
        "decoder_layers": decoder_layers or layers, "encoder_attention_heads": heads, "decoder_attention_heads": heads,
        "encoder_ffn_dim": ffn, "decoder_ffn_dim": ffn, "max_position_embeddings": max_positions,
        "scale_embedding": True, "activation_function": "swish", "pad_token_id": pad_id, "eos_token_id": eos_id,
        "decoder_start_token_id": pad_id})


def translation_loss(params: Params, batch, *, rng=None, frozen=None):
    """Teacher-forced cross entropy of an encoder-decoder on a batch of encoded pairs.

    `batch`: "source", "source_mask" (B, S); "target" (B, T+1) rows `<start> y </s>`;
    "target_mask" (B, T) marks the predicted tokens of `target[:, 1:]`. Returns
    `(mean loss per target token, {"tokens": count})`.

    Example:
        >>> # loss, metrics = translation_loss(params, next(batches))
    """
    cfg = params.config
    if cfg.encoder is None:
        raise ConfigError(f"translation_loss needs an encoder-decoder; {cfg.hf_model_type or cfg.family} is not one")
    target = jnp.asarray(batch["target"])
    if target.ndim != 2 or target.shape[1] < 2:
        raise InputError(f'batch["target"] must be (batch, length + 1) rows "<start> y </s>", got {target.shape}')
    mask = jnp.asarray(batch["target_mask"]).astype(jnp.float32)
    logits = models.forward(params, target[:, :-1], encoder_tokens=batch["source"],
                            encoder_mask=batch["source_mask"]).logits
    logp = models.token_logprobs(logits, target[:, 1:])
    count = mask.sum()
    return -(logp * mask).sum() / jnp.maximum(count, 1.0), {"tokens": count}


def train_translation(params: Params, batches, config: training.TrainConfig, valid=None, mesh=None):
    """Train (or finetune) an encoder-decoder on encoded pairs; returns `(params, history)`.

    `batches` yields encoded-pair batches (e.g. `data.pairs.PairBatches`, whose position
    is checkpointed); `valid`, optional, is a list of batches whose mean loss is logged
    every `config.eval_every` steps. As in the shared loop, `params`' buffers are donated
    to the training state: use the returned params (copy the input first to keep it).

    Example:
        >>> # params, history = train_translation(params, PairBatches(data, 32), TrainConfig(steps=2000))
    """
    if params.config.encoder is None:
        raise ConfigError("train_translation needs an encoder-decoder (T5, BART, Marian, or seq2seq.marian_config)")
    eval_fn = None
    if valid:
        def eval_fn(p):
            return training.evaluate(p, valid, translation_loss, mesh=mesh)
    state, history = training.train(config, params, batches, loss_fn=translation_loss, eval_fn=eval_fn, mesh=mesh)
    return state.params, history


def save_translation_model(params: Params, tokenizer, folder: str) -> str:
    """Write the model (Hugging Face layout) and its tokenizer into `folder`; returns it.

    Example:
        >>> # save_translation_model(params, tok, "runs/en-es"); mm.load("runs/en-es")
    """
    save_hf(params, folder)
    save_tokenizer(tokenizer, folder)
    return str(folder)
