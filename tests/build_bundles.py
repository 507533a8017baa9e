"""Write the test bundles a run without torch reads: `python -m tests.build_bundles DIR`, in the torch venv,
then `RTK_TEST_BUNDLES=DIR pytest -m serving` in the serving one.

The fixtures' own builders, once; `make test` instead keeps the bundle its main run built
(`pytest --rtk-write-bundles DIR`), so this runs only for `make test-serving` on its own.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tests.conftest import TINY_DATA, build_bundle, build_run, make_imagefolder, write_bundles


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        data = make_imagefolder(Path(tmp) / "data", TINY_DATA)
        bundle = build_bundle(build_run(data, Path(tmp) / "run"), data, Path(tmp) / "bundle")
        write_bundles(Path(argv[0]), bundle)
    print(f"wrote the test bundles to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
