"""`python -m jaxdnn.data fetch [--data-dir DIR]`: fill the MNIST cache."""

import argparse
import sys

from jaxdnn.data.mnist import FetchError, fetch_mnist


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxdnn.data", description=__doc__)
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("--data-dir", default=None, help="cache directory (default $JAXDNN_DATA_DIR "
                        "or ~/.cache/jaxdnn/mnist)")
    args = parser.parse_args(argv)
    try:
        path = fetch_mnist(args.data_dir)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MNIST ready in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
