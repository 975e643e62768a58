#!/bin/sh
# Install the real photographs and cut-outs that `copypaste:` datasets draw from (Debian / Ubuntu),
# then print the folders to pass as backgrounds=DIR / objects=DIR / emoji=FONT.
# Nothing of them is committed to linmix; run as root (or with sudo).
#
#   tools/install_sam_sources.sh            # photographs + emoji (about 60 MB)
#   tools/install_sam_sources.sh --more     # also gnome/plasma wallpapers and icon themes (about 300 MB)
set -eu

packages="mate-backgrounds fonts-noto-color-emoji"
if [ "${1:-}" = "--more" ]; then
    packages="$packages gnome-backgrounds plasma-workspace-wallpapers breeze-icon-theme adwaita-icon-theme"
fi

sudo_if_needed=""
if [ "$(id -u)" != 0 ]; then
    sudo_if_needed="sudo"
fi
$sudo_if_needed apt-get update
# shellcheck disable=SC2086  # the package list is meant to split
$sudo_if_needed apt-get install -y $packages

echo
echo "backgrounds (photographs; the default when backgrounds= is not given):"
for folder in /usr/share/backgrounds /usr/share/wallpapers; do
    if [ -d "$folder" ]; then
        echo "  $folder  ($(find "$folder" -type f \( -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.png' -o -iname '*.webp' \) | wc -l) images)"
    fi
done
echo "cut-outs:"
if [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then
    echo "  emoji=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf  (the default when objects= and emoji= are not given)"
fi
for folder in /usr/share/icons/breeze /usr/share/icons/Adwaita; do
    if [ -d "$folder" ]; then
        echo "  objects=$folder  ($(find "$folder" -type f -iname '*.png' | wc -l) PNG icons; those with an alpha channel are used)"
    fi
done
echo
echo "example: linmix sam eval --dataset copypaste:1:100:split=heldout"
