#!/usr/bin/env bash
# The main job: list the SwinV2 family, then run SwinV2-T at a size its windows do not divide.
. "$(dirname "$0")/_env.sh" base
swinv2 list
swinv2 forward --model swinv2_tiny_window8_256 --img-size 320x448 "$@"
