import re, subprocess, sys
from pathlib import Path
out = subprocess.run([".venv/bin/ruff", "check", *sys.argv[1:], "--select", "E501", "--output-format", "concise"], capture_output=True, text=True).stdout
hits = {}
for line in out.splitlines():
    m = re.match(r"(.+?):(\d+):\d+: E501", line)
    if m:
        hits.setdefault(m.group(1), []).append(int(m.group(2)))
for f, lines in hits.items():
    p = Path(f); src = p.read_text().split("\n")
    for n in sorted(lines, reverse=True):
        s = src[n - 1]
        indent = re.match(r"\s*", s).group(0)
        comment = s.lstrip().startswith("#")
        cut = s.rfind(" ", 0, 120)
        head, tail = s[:cut], s[cut + 1:]
        cont = indent + ("# " if comment else "") + tail
        if s.lstrip().startswith('"""') and not comment:
            cont = indent + tail
        src[n - 1:n] = [head, cont]
    p.write_text("\n".join(src))
    print("wrapped", f, lines)
