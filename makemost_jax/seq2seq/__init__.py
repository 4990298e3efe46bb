"""Translation models: tokenizers trained here, Marian-shaped models trained or finetuned on the
shared loop, and translation of text with every search (greedy, beam, CBS, exact, length modes).

Example:
    >>> # from makemost_jax import seq2seq
    >>> # tok = seq2seq.train_tokenizer(texts, 8000)
    >>> # params = mm.init_params(seq2seq.marian_config(tok.vocab_size, pad_id=0, eos_id=1), jax.random.key(0))
    >>> # params, history = seq2seq.train_translation(params, batches, TrainConfig(steps=3000))
"""

from makemost_jax.seq2seq.data import SPECIALS, encode_translation_pairs, save_tokenizer, train_tokenizer
from makemost_jax.seq2seq.model import marian_config, save_translation_model, train_translation, translation_loss

__all__ = ["SPECIALS", "encode_translation_pairs", "marian_config", "save_tokenizer", "save_translation_model",
           "train_tokenizer", "train_translation", "translation_loss"]
