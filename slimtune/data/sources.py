"""Text sources -> records -> (ids, labels) documents.

Sources: `pydoc` (Python's own `pydoc_data.topics`, no download), a `.txt` file, records from a `.jsonl` file
(read line by line), a `.parquet` file or a directory written by `datasets.save_to_disk`, each holding `text`,
or `prompt` + `response` (loss only on response tokens; prompt labels = -100), or `messages` (a conversation,
formatted with the tokenizer's chat template: slimtune/chat.py), or `input_ids` (already tokenized, `labels`
optional); or a nanoGPT-style `.bin` of uint16 tokens (data/cache.py maps it as it is).
"""

from __future__ import annotations

import json
from pathlib import Path

from slimtune.chat import check_messages, chat_tokens, require_template
from slimtune.errors import SlimtuneError

IGNORE = -100


def load_records(source: str) -> list[dict]:
    """[{'text': ...}], [{'prompt': ..., 'response': ...}], [{'messages': [...]}] or [{'input_ids': [...]}]
    from `data.source`, all in memory (the token cache streams them instead: iter_records)."""
    return list(iter_records(source))


def iter_records(source: str):
    """The records of `data.source` one by one, each checked as it comes (a `.jsonl` is read line by line,
    so a large file is never whole in memory)."""
    if source == "pydoc":
        from pydoc_data.topics import topics

        yield from ({"text": topics[k]} for k in sorted(topics))
        return
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _checked(_saved_dataset_rows(path), str(path), "row")
        return
    if not path.is_file():
        raise SlimtuneError(
            f"data.source={source!r}: file not found; give pydoc, a .txt, .jsonl or .parquet path "
            "or a datasets.save_to_disk directory"
        )
    if path.suffix == ".txt":
        yield {"text": path.read_text(encoding="utf-8", errors="replace")}
        return
    if path.suffix == ".parquet":
        pq = _pyarrow(source).parquet
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001  (pyarrow raises its own error types)
            raise SlimtuneError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from None
        yield from _checked(rows, str(path), "row")
        return
    if path.suffix != ".jsonl":
        raise SlimtuneError(f"data.source={source!r}: unsupported file type; use .txt, .jsonl, .parquet or .bin")
    n_records = 0
    for first, lines in jsonl_chunks(path, 1):
        for rec in parse_jsonl(path, first, lines):
            n_records += 1
            yield rec
    if not n_records:
        raise SlimtuneError(f"{path}: no records; one JSON object per line")


def jsonl_chunks(path: Path, lines_per_chunk: int):
    """(number of its first line, raw lines) of a .jsonl file, lines_per_chunk lines at a time."""
    with open(path, "rb") as f:
        first, chunk = 1, []
        for raw in f:
            chunk.append(raw)
            if len(chunk) == lines_per_chunk:
                yield first, chunk
                first, chunk = first + len(chunk), []
        if chunk:
            yield first, chunk


def parse_jsonl(path: Path, first: int, lines: list[bytes]) -> list[dict]:
    """The records of raw .jsonl lines numbered from `first`, each checked (one line naming a bad one)."""
    out = []
    for n, raw in enumerate(lines, first):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SlimtuneError(
                f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimtuneError(f"{path}:{n}: not valid JSON ({e.msg}); one JSON object per line") from None
        check_record(rec, f"{path}:{n}", "line")
        out.append(rec)
    return out


def check_record(rec, at: str, unit: str) -> None:
    """A record holds `text`, or `prompt` + `response`, or `messages`, or `input_ids` (already tokenized, with
    optional `labels`, -100 for no loss); else one line naming it."""
    if isinstance(rec, dict) and "messages" in rec:
        check_messages(rec, at)
        return
    if isinstance(rec, dict) and "input_ids" in rec:
        ids, labels = rec["input_ids"], rec.get("labels", rec["input_ids"])
        ok = isinstance(ids, list) and all(isinstance(t, int) and t >= 0 for t in ids)
        if not ok or not isinstance(labels, list) or len(labels) != len(ids):
            raise SlimtuneError(f"{at}: 'input_ids' must be a list of token ids (and 'labels', if given, as long)")
        return
    ok = isinstance(rec, dict) and (
        isinstance(rec.get("text"), str)
        or (isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str))
    )
    if not ok:
        raise SlimtuneError(
            f"{at}: each {unit} needs a 'text' string, 'prompt' and 'response' strings, 'messages' or 'input_ids'"
        )


def _checked(records: list, where: str, unit: str) -> list[dict]:
    for i, rec in enumerate(records):
        check_record(rec, f"{where}: {unit} {i}", unit)
    if not records:
        raise SlimtuneError(f"{where}: no records")
    return records


def _pyarrow(source: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise SlimtuneError(
            f"data.source={source}: reading parquet / saved datasets needs pyarrow: pip install pyarrow"
        ) from None
    return pyarrow


def _saved_dataset_rows(path: Path) -> list:
    """Rows of a `datasets.save_to_disk` dir (its Arrow stream shards; a DatasetDict: its `train` split)."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise SlimtuneError(
                f"data.source={path}: a DatasetDict without a 'train' split ({splits}); give the split's directory"
            )
        path = path / "train"
    state = path / "state.json"
    if not state.is_file():
        raise SlimtuneError(
            f"data.source={path}: a directory without state.json; give a datasets.save_to_disk directory, or a file"
        )
    pa = _pyarrow(str(path))
    rows = []
    try:
        for f in json.loads(state.read_text())["_data_files"]:
            with pa.memory_map(str(path / f["filename"])) as src:
                rows += pa.ipc.open_stream(src).read_all().to_pylist()
    except (OSError, KeyError, ValueError, pa.ArrowInvalid) as e:
        raise SlimtuneError(f"data.source={path}: cannot read the saved dataset ({str(e).splitlines()[0]})") from None
    return rows


def documents(
    records: list[dict], tokenizer, train_on: str = "assistant", source: str = "?"
) -> list[tuple[list[int], list[int]]]:
    """Each record as (ids, labels): text ended by eos; prompt (no loss) + response + eos; a conversation
    through the chat template (loss on assistant turns unless train_on=all)."""
    out = []
    eos = tokenizer.eos_token_id
    for n, rec in enumerate(records):
        if "messages" in rec:
            require_template(tokenizer, source)
            out.append(chat_tokens(rec["messages"], tokenizer, train_on, f"data.source={source}: record {n}"))
        elif "input_ids" in rec:
            out.append((list(rec["input_ids"]), list(rec.get("labels", rec["input_ids"]))))
        elif "text" in rec:
            t = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
            out.append((t, list(t)))
        else:
            p = tokenizer(rec["prompt"], add_special_tokens=False)["input_ids"]
            r = tokenizer(rec["response"], add_special_tokens=False)["input_ids"] + [eos]
            out.append((p + r, (list(p) if train_on == "all" else [IGNORE] * len(p)) + r))
    return out


def tokenize(records: list[dict], tokenizer, train_on: str = "assistant") -> tuple[list[int], list[int]]:
    """Concatenate records (each ended by eos) into one token stream with its labels."""
    ids, labels = [], []
    for i, y in documents(records, tokenizer, train_on):
        ids += i
        labels += y
    return ids, labels
