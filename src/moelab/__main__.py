"""`python -m moelab` (and `torchrun ... -m moelab calibrate ...`): the same as the `moelab` command."""

from moelab.cli import main

if __name__ == "__main__":
    main()
