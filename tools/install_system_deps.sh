#!/usr/bin/env bash
# System packages kelly's audio layer needs: FluidSynth (the MIDI renderer) and a General MIDI soundfont (FluidR3).
# Installs them with apt where it can (Debian/Ubuntu, as root or with passwordless sudo); elsewhere it says what to do
# and exits 0, so the Python install still goes ahead (kelly.audio then raises AudioError with the same hint).
set -u
missing=()
command -v fluidsynth >/dev/null 2>&1 || missing+=(fluidsynth)
[ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ] || [ -n "${KELLY_SOUNDFONT:-}" ] || missing+=(fluid-soundfont-gm)
[ ${#missing[@]} -eq 0 ] && { echo "system packages: fluidsynth and a GM soundfont are present"; exit 0; }
if command -v apt-get >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n"; }
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "system packages: installing ${missing[*]} with apt-get"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null && exit 0
    echo "system packages: apt-get could not install ${missing[*]}" >&2; exit 1
  fi
  echo "system packages: missing ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2; exit 0
fi
if command -v brew >/dev/null 2>&1; then
  echo "system packages: missing ${missing[*]}; on macOS: brew install fluid-synth, then download a General MIDI soundfont (.sf2) and set KELLY_SOUNDFONT=/path/to/it" >&2; exit 0
fi
echo "system packages: missing ${missing[*]}; install FluidSynth and a General MIDI soundfont (.sf2), and set KELLY_SOUNDFONT to the .sf2 file" >&2
exit 0
