"""Convert a public Stable Diffusion 1.x checkpoint into drp's weights folder (default `weights/`).

    python convert_weights.py --download                       # fetch SD 1.5, then convert it
    python convert_weights.py v1-5-pruned-emaonly.safetensors  # a single file (.safetensors or .ckpt)
    python convert_weights.py path/to/stable-diffusion-v1-5    # a diffusers folder
    python convert_weights.py --download ip-adapter            # add IP-Adapter (or ip-adapter-plus) and its encoder
    python convert_weights.py --download ip-adapter --ip-adapter-url https://mirror/h94/   # from another address
    python convert_weights.py ip-adapter_sd15.safetensors      # add an IP-Adapter file (.safetensors or .bin)
    python convert_weights.py path/to/models/image_encoder     # add the CLIP image encoder IP-Adapter reads

The folder then holds unet.safetensors, vae.safetensors, text_encoder.safetensors and model.json,
which `drp.load()` reads. See drp/convert.py for what is checked along the way. IP-Adapter files add
ip_adapter.safetensors / image_encoder.safetensors (+ their JSON) to the same folder without --force
(drp/convert_ip_adapter.py); `--download ip-adapter` keeps the fetched files in DIR/h94-IP-Adapter/, from
h94/IP-Adapter on Hugging Face, or from `--ip-adapter-url` ($DRP_IP_ADAPTER_URL), a base address under
which the files sit in the same layout (models/ip-adapter_sd15.safetensors, models/image_encoder/…).

`--download` saves the checkpoint as DIR/<file name of the URL>, i.e. weights/v1-5-pruned-emaonly.safetensors
(SRC, if given, names another place: write it before `--download`, which would take it for its choice),
and keeps it after converting; an existing complete file is not downloaded again, an interrupted one is
resumed. The default file must have its published sha256 (so must h94's image encoder); a file from another
address (--url, --ip-adapter-url) must have the sha256 its server states, when it states one.
"""

import argparse
import sys

from drp.errors import DrpError


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Convert an SD 1.x checkpoint (single .safetensors/.ckpt file or diffusers folder) "
                    "into drp's weights folder.")
    parser.add_argument("src", nargs="?", metavar="SRC",
                        help="checkpoint file or diffusers folder; with --download: where to save the "
                             "download (default DIR/<file name of the URL>)")
    parser.add_argument("--out", default="weights", metavar="DIR", help="folder to write (default: weights)")
    parser.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16",
                        help="number format of the written files (default: fp16, half the size)")
    parser.add_argument("--force", action="store_true", help="replace weights already converted in DIR")
    parser.add_argument("--download", nargs="?", const="sd15", choices=["sd15", "ip-adapter", "ip-adapter-plus"],
                        help="first download the public SD 1.5 single file (about 4 GB; an existing "
                             "complete file is reused, an interrupted download resumed), then convert it; "
                             "`--download ip-adapter` (or ip-adapter-plus) fetches h94/IP-Adapter's SD 1.5 "
                             "adapter and image encoder instead and adds them to DIR")
    parser.add_argument("--url", help="address to download from (default: $DRP_WEIGHTS_URL, else the "
                                      "stable-diffusion-v1-5 file on Hugging Face)")
    parser.add_argument("--ip-adapter-url", metavar="URL",
                        help="with --download ip-adapter(-plus): the base address under which the files sit in "
                             "h94's layout, models/ip-adapter_sd15.safetensors and models/image_encoder/ "
                             "(default: $DRP_IP_ADAPTER_URL, else h94/IP-Adapter on Hugging Face)")
    args = parser.parse_args(argv)
    if args.src is None and not args.download:
        parser.error("give SRC (a checkpoint file or diffusers folder) or --download")
    if args.url and not args.download:
        parser.error("--url only makes sense with --download")
    if args.url and args.download != "sd15":
        parser.error("--url names the SD 1.5 file; give IP-Adapter's address with --ip-adapter-url")
    if args.ip_adapter_url and args.download not in ("ip-adapter", "ip-adapter-plus"):
        parser.error("--ip-adapter-url only makes sense with --download ip-adapter (or ip-adapter-plus)")

    try:
        from drp.convert import check_can_write, convert

        src = args.src
        if args.download in ("ip-adapter", "ip-adapter-plus"):
            from drp.convert_ip_adapter import download_and_convert

            written = download_and_convert(args.download, args.out, args.dtype, args.force, progress=True,
                                           base_url=args.ip_adapter_url)
            for path in written:
                print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
            return 0
        if args.download:
            from drp.download import checkpoint_path, download, pinned, weights_url

            check_can_write(args.out, args.force)  # before, not after, a 4 GB download

            url = weights_url(args.url)
            src = download(url, args.src or checkpoint_path(args.out, url), progress=True, sha256=pinned(url)[0])
            print(f"checkpoint: {src}")
        for path in convert(src, args.out, dtype=args.dtype, force=args.force, progress=True):
            print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    except DrpError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
