"""The Python API's Quick Start, run against a gateway.

The only change from the library's Quick Start is the first step: instead of building and
initializing a DiT handler and an LM handler in this process, the script connects an
``AceStepClient`` to a gateway (the models run in the services). Parameters, call and result
handling are the same.

    python examples/quickstart.py [GATEWAY_ADDRESS] [SAVE_DIR]

GATEWAY_ADDRESS defaults to 127.0.0.1:50050, SAVE_DIR to ./output.
"""

import sys

from gateway.sdk import AceStepClient, GenerationConfig, GenerationParams, generate_music

# The one difference: a gateway client takes the place of the two handlers.
client = AceStepClient(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50050")
save_dir = sys.argv[2] if len(sys.argv) > 2 else "output"

# What to generate: a 30 s dance track at 128 BPM; the LM plans everything else.
params = GenerationParams(
    caption="upbeat electronic dance music with heavy bass",
    bpm=128,
    duration=30,
)

# How many songs and in which container.
config = GenerationConfig(
    batch_size=2,
    audio_format="flac",
)

result = generate_music(client, params, config, save_dir=save_dir)

if result.success:
    for audio in result.audios:
        print(f"Generated: {audio['path']}")
        print(f"Key: {audio['key']}")
        print(f"Seed: {audio['params']['seed']}")
else:
    print(f"Error: {result.error}")
    sys.exit(1)
