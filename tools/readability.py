"""Readability figures of Python files, as the readability issue's table measures them.

    python tools/readability.py                      # the six files of the method
    python tools/readability.py generate.py runs.py  # any others

lines: all lines, and per file; over 120: lines longer than 120 characters (none allowed); over 100: lines
longer than 100 characters (% of all lines); blank in bodies: blank lines inside function bodies (% of the
body lines, from the line after the def's signature to the body's last line);
tokens / code line: Python tokens (no comments, newlines or indents) per non-blank, non-comment line;
one-line ifs: `if ...: statement` on one line, and conditional expressions `a if c else b`, per 100
code lines; parallel: assignments of two or more
names from a tuple of as many values (`a, b = x, y`), per 100 code lines.
"""
import ast
import io
import os
import sys
import tokenize

METHOD = ["cwpo.py", "model.py", "data.py", "train_weak.py", "train_policy.py", "eval.py"]

SKIP = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
        tokenize.ENCODING, tokenize.ENDMARKER}


def figures(paths):
    lines = over = too_long = body = blank = code = tokens = one_line_ifs = ternaries = parallel = 0
    per_file = {}
    for path in paths:
        text = open(path, encoding="utf-8").read()
        rows = text.splitlines()
        per_file[os.path.basename(path)] = len(rows)
        lines += len(rows)
        over += sum(len(r) > 100 for r in rows)
        too_long += sum(len(r) > 120 for r in rows)
        tree = ast.parse(text)
        in_body = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_body.update(range(node.body[0].lineno, node.end_lineno + 1))
            if isinstance(node, ast.If) and node.body[0].lineno == node.lineno:
                one_line_ifs += 1
            if isinstance(node, ast.IfExp):
                ternaries += 1
            if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)
                    and isinstance(node.value, ast.Tuple)
                    and len(node.targets[0].elts) == len(node.value.elts) >= 2):
                parallel += 1
        body += len(in_body)
        blank += sum(1 for n in in_body if not rows[n - 1].strip())
        toks = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in SKIP]
        code_rows = {t.start[0] for t in toks}
        code += len(code_rows)
        tokens += len(toks)
    return {"lines": lines, "per file": " ".join(f"{n} {c}" for n, c in per_file.items()),
            "over 120": too_long, "over 100 %": 100 * over / lines, "blank in bodies %": 100 * blank / body,
            "tokens / code line": tokens / code, "one-line ifs / 100": 100 * one_line_ifs / code,
            "conditional expr / 100": 100 * ternaries / code,
            "parallel / 100": 100 * parallel / code}


if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = sys.argv[1:] or [os.path.join(root, name) for name in METHOD]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        sys.exit(f"readability.py: no such file: {missing[0]}")
    for name, value in figures(files).items():
        print(f"{name:20} {value:.1f}" if isinstance(value, float) else f"{name:20} {value}")
