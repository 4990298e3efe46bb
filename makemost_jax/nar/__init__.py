"""MLM-initialised non-autoregressive seq2seq (METHODS.md section 4): model, SUNDAE, decoding, AR baseline.

Example:
    >>> # import makemost_jax as mm
    >>> # from makemost_jax import nar
    >>> # mlm = nar.add_mlm_head(mm.load(minilm_dir)); tok = mm.load_tokenizer(minilm_dir)
    >>> # params = nar.init_seq2seq(mlm, nar.seq2seq_config(mlm, tok, max_source=48, max_target=48))
    >>> # data = nar.encode_pairs(tok, nar.read_pairs(nar.asset_path("bible_kjv_web_train.jsonl")), params.config)
    >>> # params, history = nar.train_seq2seq(params, nar.PairBatches(data, 16), TrainConfig(steps=300))
    >>> # nar.translate(params, tok, ["Thou shalt not kill."], nar.DecodeConfig(steps=10))
"""

from makemost_jax.nar.ar import ar_beam, ar_greedy, ar_logits_full, ar_loss
from makemost_jax.nar.data import PairBatches, asset_path, encode_pairs, encode_sources, fixed_batches, read_pairs
from makemost_jax.nar.decode import DecodeConfig, DecodeResult, nar_decode, nar_decode_steps, predict_lengths
from makemost_jax.nar.model import (
                                    Seq2SeqConfig,
                                    Seq2SeqParams,
                                    add_mlm_head,
                                    cross_kv,
                                    encode,
                                    init_seq2seq,
                                    length_logits,
                                    nar_logits,
                                    seq2seq_config,
                                    special_ids,
)
from makemost_jax.nar.sundae import SundaeConfig, corrupt, sundae_loss
from makemost_jax.nar.train import (
                                    bleu,
                                    decode_batched,
                                    decode_tokens,
                                    load_seq2seq,
                                    loss_function,
                                    normalise_references,
                                    resolve_mlm,
                                    save_seq2seq,
                                    timed_decode,
                                    train_seq2seq,
                                    translate,
                                    translate_steps,
)

__all__ = ["DecodeConfig", "DecodeResult", "PairBatches", "Seq2SeqConfig", "Seq2SeqParams", "SundaeConfig",
           "add_mlm_head", "ar_beam", "ar_greedy", "ar_logits_full", "ar_loss", "asset_path", "bleu", "corrupt",
           "cross_kv", "decode_batched", "decode_tokens", "encode", "encode_pairs", "encode_sources", "fixed_batches",
           "init_seq2seq", "length_logits", "load_seq2seq", "loss_function", "nar_decode", "nar_decode_steps",
           "nar_logits", "normalise_references", "predict_lengths", "read_pairs", "resolve_mlm", "save_seq2seq",
           "seq2seq_config", "special_ids", "sundae_loss", "timed_decode", "train_seq2seq", "translate",
           "translate_steps"]
