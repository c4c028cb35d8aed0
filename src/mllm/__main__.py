"""`python -m mllm ...` (and `torchrun -m mllm train ...`) run the same CLI as `mllm ...`."""

from mllm.cli import main

if __name__ == "__main__":
    main()
