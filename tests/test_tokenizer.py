"""The sentencepiece-only ChatGLM tokenizer against diffusers' ChatGLMTokenizer."""

import logging
import subprocess
import sys

import numpy as np
import pytest

from kolors_trt.runtime.tokenizer import SPECIAL_TOKENS, ChatGLMTokenizer, TokenizerError

spm = pytest.importorskip("sentencepiece")

PROMPTS = [
    "a photo of a cat sitting on a red sofa, high quality",
    "一只可爱的小猫坐在红色沙发上，高质量",
    "Kolors 生成 a 山水画 at sunset, 4k, 超高清",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\n",
    "emoji 😀🐱🎨 and rare 𠮷 characters",
    "special text: [gMASK] sop <|user|> </s> <unk> <s> [MASK]",
    "Aesop's laptop sop isop",
    "ÀÉÎõü — naïve café ½ ™",
    "ｆｕｌｌｗｉｄｔｈ　全角　ＡＢＣ",
]


def _train(folder, corpus, vocab_size, **options):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, **options,
    )
    return folder / "tokenizer.model"


def _train_variant(folder):
    """A second model: no byte fallback, pieces spelled like special tokens, default normalisation."""
    corpus = [f"{i} the quick brown fox sop [MASK] 狐狸 跳过 懒狗 aesop laptop" for i in range(300)]
    return _train(folder, corpus, 120, user_defined_symbols=["sop", "[MASK]"])


def _train_fallback(folder):
    """Used when kolors_trt.export.tiny is not importable: its recipe, on a small mixed corpus."""
    en = "a photo of the cat dog sitting on red blue sofa in sunny room high quality painting mountains".split()
    zh = list("一只可爱的小猫坐在红色沙发上阳光明媚房间高质量山水画日落河流")
    corpus = [
        " ".join(en[(i * 7 + k) % len(en)] for k in range(4 + i % 9)) + "，" + "".join(zh[(i * 5 + k) % len(zh)] for k in range(3 + i % 7))
        for i in range(2000)
    ]
    return _train(folder, corpus, 500, byte_fallback=True, remove_extra_whitespaces=False)


@pytest.fixture(scope="module", params=["tiny", "variant"])
def model_path(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tokenizer_{request.param}")
    if request.param == "variant":
        return _train_variant(folder)
    try:
        from kolors_trt.export.tiny import train_tokenizer
    except ImportError:
        return _train_fallback(folder)
    return train_tokenizer(folder)


@pytest.fixture(scope="module")
def pair(model_path):
    kolors_tokenizer = pytest.importorskip("diffusers.pipelines.kolors.tokenizer")
    reference = kolors_tokenizer.ChatGLMTokenizer(vocab_file=str(model_path))
    return ChatGLMTokenizer.from_file(model_path), reference


def _reference(reference, prompts, length=256):
    out = reference(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return {k: out[k].numpy() for k in ("input_ids", "attention_mask", "position_ids")}


def _assert_same(ours, ref):
    assert set(ours) == {"input_ids", "attention_mask", "position_ids"}
    for key, value in ours.items():
        assert value.dtype == np.int64, key
        np.testing.assert_array_equal(value, ref[key], err_msg=key)


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_single_prompt_matches_diffusers(pair, prompt):
    ours, reference = pair
    result = ours([prompt])
    assert result["input_ids"].shape == (1, 256)
    _assert_same(result, _reference(reference, [prompt]))


def test_batch_matches_diffusers(pair):
    ours, reference = pair
    _assert_same(ours(PROMPTS), _reference(reference, PROMPTS))
    _assert_same(ours(PROMPTS[0]), _reference(reference, [PROMPTS[0]]))


def test_layout(pair):
    ours, _ = pair
    out = ours(["a cat", ""])
    vocab = ours.sp.vocab_size()
    gmask, sop = vocab + SPECIAL_TOKENS.index("[gMASK]"), vocab + SPECIAL_TOKENS.index("sop")
    empty = out["input_ids"][1]
    assert list(empty[-2:]) == [gmask, sop] and np.all(empty[:-2] == 0)
    assert list(out["attention_mask"][1][-3:]) == [0, 1, 1]
    n = int(out["attention_mask"][0].sum())
    assert list(out["input_ids"][0][-n:][:2]) == [gmask, sop]
    np.testing.assert_array_equal(out["position_ids"][0][-n:], np.arange(n))
    assert np.all(out["position_ids"][0][:-n] == 0)
    assert ours.decode(out["input_ids"][0]).strip() == "a cat"


@pytest.mark.parametrize("extra", [-3, -2, -1, 0, 1, 2, 400])
def test_truncation_matches_diffusers(pair, caplog, extra):
    ours, reference = pair
    unit = "cat 猫 "
    per = len(ours.piece_ids(unit * 10)) / 10
    # grow the prompt until it is exactly 254 + extra pieces long (254 = 256 - 2 prefix tokens)
    words = max(1, int(254 / per) - 5)
    while len(ours.piece_ids(unit * words)) < 254 + extra:
        words += 1
    prompt = unit * words
    pieces = len(ours.piece_ids(prompt))
    with caplog.at_level(logging.WARNING, logger="kolors_trt.runtime.tokenizer"):
        result = ours([prompt, "short"])
    _assert_same(result, _reference(reference, [prompt, "short"]))
    dropped = pieces - 254
    if dropped > 0:
        assert f"dropped {dropped}" in caplog.text
        assert result["attention_mask"][0].all()
    else:
        assert "dropped" not in caplog.text


def test_other_max_length(pair):
    ours, reference = pair
    short = ChatGLMTokenizer(ours.sp, max_length=16)
    prompts = ["a photo of a cat sitting on a red sofa, high quality, 一只可爱的小猫", "cat"]
    _assert_same(short(prompts), _reference(reference, prompts, length=16))


def test_special_spelled_piece_gets_special_id(tmp_path):
    model = _train_variant(tmp_path)
    ours = ChatGLMTokenizer.from_file(tmp_path)
    ids = ours.piece_ids("laptop sop")
    assert ours.special_ids["sop"] in ids  # the piece "sop" maps like diffusers' convert_token_to_id
    assert ours.sp.piece_to_id("sop") not in ids
    assert model.name == "tokenizer.model"


def test_errors(tmp_path, pair):
    ours, _ = pair
    with pytest.raises(TokenizerError, match="not found"):
        ChatGLMTokenizer.from_file(tmp_path / "missing")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        ChatGLMTokenizer.from_file(bad)
    with pytest.raises(TokenizerError, match="prompt 1 is a NoneType"):
        ours(["ok", None])
    with pytest.raises(TokenizerError, match="non-empty"):
        ours([])
    with pytest.raises(TokenizerError, match="max_length"):
        ChatGLMTokenizer(ours.sp, max_length=2)


def test_runtime_imports_stay_light():
    code = (
        "import sys, kolors_trt.runtime.tokenizer, kolors_trt.runtime.preprocess, kolors_trt.runtime.scheduler;"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'onnx', 'kolors_trt.export', 'kolors_trt.engines')"
        " if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
