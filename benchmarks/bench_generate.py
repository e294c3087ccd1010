"""NBP vs NTP generation time, side by side in one run (see modeling_nbp/bench.py; also `nbp bench`)."""

from modeling_nbp.bench import main

if __name__ == "__main__":
    main()
