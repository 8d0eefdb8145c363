"""Pastes the tables that the benchmark scripts wrote into benchmarks/RESULTS.md.

RESULTS.md holds blocks like::

    <!-- BEGIN results/step_cpu.md -->
    ...generated...
    <!-- END results/step_cpu.md -->

and this script replaces each block's body with the current content of the named
file (paths relative to ``benchmarks/``), rewriting image links so that they still
point at ``results/``.  A block whose file does not exist is left as it is.

    python benchmarks/bench_step.py --markdown benchmarks/results/step_cpu.md --plot benchmarks/results/step_cpu.png
    python benchmarks/bench_train.py --markdown benchmarks/results/train_cpu.md --plots benchmarks/results
    python benchmarks/update_results.py
"""

from __future__ import annotations

import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = re.compile(r"(<!-- BEGIN (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- END (?P=path) -->)", re.S)


def fill(text: str, root: str = HERE) -> tuple[str, list[str]]:
    done = []

    def repl(m):
        path = os.path.join(root, m.group("path"))
        if not os.path.exists(path):
            return m.group(0)
        with open(path, encoding="utf-8") as f:
            body = f.read().rstrip() + "\n"
        folder = os.path.dirname(m.group("path"))
        if folder:  # images next to the generated file live under that folder
            body = re.sub(r"!\[([^\]]*)\]\((?!https?:|/)([^)]+)\)",
                          lambda im: f"![{im.group(1)}]({folder}/{im.group(2)})", body)
        done.append(m.group("path"))
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(repl, text), done


def main(path: str = os.path.join(HERE, "RESULTS.md")) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    new, done = fill(text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    print(f"{path}: refreshed {', '.join(done) if done else 'nothing'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
