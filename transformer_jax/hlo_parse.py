"""HLO text, as `compiled.as_text()` prints it, parsed into computations of instructions.

    comps, entry = parse_module(text)   # {name: Computation}, the ENTRY computation's name
    comps[entry].instrs[0]              # Instr(name, shape, opcode, operands, attrs)
    shape_bytes("(f32[8,128]{1,0}, bf16[4])")   # 4104.0

Only what the analyses need (hlo_analysis.py): names, shapes with their layouts, opcodes,
operand names and the attribute text after the operands, kept as written.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|c64|c128|f8e\w+)\[([^\]]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    root: Instr | None = None

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}
        self.users: dict[str, list[Instr]] = defaultdict(list)
        for i in self.instrs:
            for op in i.operands:
                self.users[op].append(i)


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string; tuples sum their elements."""
    total = 0.0
    for dtype, dims in ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1)
        total += size * math.prod(int(d.lstrip("<=")) for d in dims.split(",") if d.strip())
    return total


def shape_dims(shape: str) -> list[int]:
    m = ARRAY.search(shape)
    return [int(d.lstrip("<=")) for d in m.group(2).split(",") if d.strip()] if m else []


def _matching(s: str, start: int) -> int:
    """Index of the bracket closing the one at s[start]."""
    depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
    for i in range(start, len(s)):
        if s[i] in pairs:
            depth += 1
        elif s[i] in pairs.values():
            depth -= 1
            if depth == 0:
                return i
    return len(s) - 1


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _parse_instr(line: str) -> tuple[Instr, bool] | None:
    body = _COMMENT.sub("", line).strip()  # long operand lists carry /*index=5*/ markers
    root = body.startswith("ROOT ")
    body = body[5:] if root else body
    name, eq, rest = body.partition(" = ")
    if not eq:
        return None
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    open_at = m.end() - 1
    close = _matching(rest, open_at)
    operands = [op.split()[-1].lstrip("%") for op in _split_top(rest[open_at + 1:close]) if op]
    return Instr(name.lstrip("%"), shape, m.group(1), operands, rest[close + 1:]), root


def parse_module(text: str) -> tuple[dict[str, Computation], str]:
    """({computation name: Computation}, entry name) of an HLO module's text."""
    comps, entry, current, instrs, root = {}, None, None, [], None
    for line in text.splitlines():
        if not line.strip() or line.startswith("HloModule"):
            continue
        if not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split()
            is_entry = head[0] == "ENTRY"
            current = (head[1] if is_entry else head[0]).lstrip("%")
            entry = current if is_entry else entry
            instrs, root = [], None
        elif line.startswith("}") and current:
            comps[current] = Computation(current, instrs, root)
            current = None
        elif current:
            parsed = _parse_instr(line)
            if parsed:
                instrs.append(parsed[0])
                root = parsed[0] if parsed[1] else root
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry
