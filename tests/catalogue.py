"""docs/errors.md and the tests that run its commands share this: how a command is shown and
how its message is written down (paths, PIDs and times made stable), and how the page is read
back, so a message that changes without the page fails a test (python docs/make_errors.py
writes the page anew)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "errors.md"
HINT = " (set HYDRA_FULL_ERROR=1 to see the traceback)"


def message(stderr: str, tmp: Path) -> str:
    """The paragraph dtune printed, on one line, with what differs from run to run replaced:
    the temporary folder (DIR), the repository (REPO), a lock holder's PID, host and time."""
    text = " ".join(stderr.replace(str(tmp), "DIR").replace(str(ROOT), "REPO").split())
    text = text.replace(HINT, "")
    text = re.sub(r"PID \d+ on host \S+, since [\d-]+ [\d:]+", "PID N on host H, since T", text)
    return text[text.find("dtune: error:"):] if "dtune: error:" in text else text


def entry(name: str, command: str, text: str) -> str:
    return f"### {name}\n\n`{command}`\n\n> {text}\n"


def read_page() -> dict[str, str]:
    """{case name: its catalogued message}, as docs/errors.md holds them."""
    found = re.findall(r"^### (.+?)\n\n`.*?`\n\n> (.*?)\n", PAGE.read_text(), re.M | re.S)
    return dict(found)


def stale(name: str, text: str) -> str | None:
    """Why the page does not hold `text` for `name`, or None when it does."""
    page = read_page()
    if name not in page:
        return f"docs/errors.md has no entry {name!r}: run python docs/make_errors.py"
    if page[name] != text:
        return (f"docs/errors.md is stale for {name!r}: it says\n  {page[name]}\nand dtune now "
                f"says\n  {text}\nrun python docs/make_errors.py")
    return None
