"""The web demo: `python demo/app.py --model exp/fsdd/best` (the same as `asr demo`). See asr/serve/demo.py."""

from asr.serve.demo import main

if __name__ == "__main__":
    main()
