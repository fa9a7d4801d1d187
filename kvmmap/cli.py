"""The ``kvmmap`` console script (also ``python -m kvmmap``): ``inspect``, ``verify``,
``compact``, ``compress``, ``convert``, ``demo``, each a thin front end over :mod:`kvmmap.tools`.

Exit status: 0 on success; 1 when ``verify`` finds damage or a command fails (a missing
or damaged file, bad input, too little memory: one line on stderr, never a traceback); 2
for a bad command line; 3 when a writer committed while ``verify`` or ``compress`` read
the file and changed what they read (nothing is known to be damaged: run it again); 130
when interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys

from ._version import __version__
from .errors import KVMmapError
from .formats import FORMATS

EXIT_CHANGED = 3        # a writer changed the file while it was read: rerun


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error message instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _progress(args) -> bool | None:
    return False if args.no_progress else None


def _cmd_inspect(args) -> int:
    from .tools.inspect import format_inspect, inspect_cache

    info = inspect_cache(args.file)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def _cmd_verify(args) -> int:
    from .tools.verify import format_verify, verify_cache

    res = verify_cache(args.file, progress=_progress(args), commit="previous" if args.previous else "newest")
    print(json.dumps(res, indent=2) if args.json else format_verify(res))
    return {"ok": 0, "changed": EXIT_CHANGED}.get(res["outcome"], 1)


def _cmd_compact(args) -> int:
    from .cache import PagedKVCache
    from .tools.common import check_regular_file, human_bytes

    check_regular_file(args.file)
    with PagedKVCache.open(args.file, mode="r+") as c:
        res = c.compact()
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.file}: {human_bytes(res['bytes_on_disk_before'])} on disk before, "
              f"{human_bytes(res['bytes_on_disk_after'])} after ({res['pages_free']} free pages given back)")
    return 0


def _cmd_compress(args) -> int:
    from .compress import KVCacheCompressor
    from .tools.common import human_bytes
    from .tools.rewrite import compress_cache

    method = None if args.method == "none" else args.method
    for opt, applies in (("rank", ("lowrank", "hybrid")), ("energy", ("lowrank", "hybrid")),
                         ("group_heads", ("lowrank", "hybrid")), ("quant_bits", ("hybrid",)),
                         ("codebook_size", ("vq",)), ("subvector_dim", ("vq",))):
        if getattr(args, opt) is not None and method not in applies:
            args.parser.error(f"--{opt.replace('_', '-')} applies to --method {' or '.join(applies)}, "
                              f"not {args.method}")
    compressor = None
    if method:
        opts = {o: getattr(args, o) for o in ("rank", "codebook_size", "quant_bits", "energy", "group_heads",
                                                "subvector_dim") if getattr(args, o) is not None}
        compressor = KVCacheCompressor(method, seed=args.seed, **opts)
    r = compress_cache(args.input, args.output, k_format=args.k_format, v_format=args.v_format,
                       compressor=compressor, overwrite=args.overwrite, progress=_progress(args))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    b0, b1 = r["bytes_on_disk_before"], r["bytes_on_disk_after"]
    print(f"{r['src']} (K {r['k_format_before']}, V {r['v_format_before']}) -> "
          f"{r['dst']} (K {r['k_format']}, V {r['v_format']}), method {args.method}")
    print(f"  sequences  {r['sequences']}, {r['tokens']} tokens over all layers, "
          f"{r['shared_pages']} pages shared by forks")
    change = f"{b0 / b1:.2f}x smaller" if b1 <= b0 else f"{b1 / b0:.2f}x larger"
    print(f"  on disk    {human_bytes(b0)} -> {human_bytes(b1)} ({change})")
    print(f"  apparent   {human_bytes(r['apparent_bytes_before'])} -> {human_bytes(r['apparent_bytes_after'])}")
    print(f"  error      K {r['k_rel_error']:.4g}, V {r['v_rel_error']:.4g}  (||before - after|| / ||before||)")
    if method and r["method_ratio"]:
        ratio = r["method_ratio"]
        size = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
        print(f"  {method:<10} its compressed representation is {size} than float32 "
              f"({r['method_ratio_shared']:.2f}x with basis / codebooks shared); the file stores its reconstruction "
              f"in the formats above")
    return 0


_CONVERT_DEFAULTS = {"k_format": "int8", "v_format": "int8", "page_size": 16, "fingerprint": ""}


def _cmd_convert(args) -> int:
    from .tools.common import human_bytes

    if args.upgrade:
        return _cmd_upgrade(args)
    if args.in_place:
        args.parser.error("--in-place applies to --upgrade only")
    if args.output is None:
        args.parser.error("the following arguments are required: output")
    for opt, default in _CONVERT_DEFAULTS.items():
        if getattr(args, opt) is None:
            setattr(args, opt, default)
    from .tools.convert import convert

    r = convert(args.input, args.output, k_format=args.k_format, v_format=args.v_format, page_size=args.page_size,
                name=args.name, append=args.append, overwrite=args.overwrite, fingerprint=args.fingerprint,
                progress=_progress(args))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['src']} -> {r['dst']}: {len(r['sequences'])} sequence(s) of {r['tokens']} tokens "
          f"({', '.join(map(repr, r['sequences'][:4]))}{' ...' if len(r['sequences']) > 4 else ''}), "
          f"{r['layers']} layers x {r['heads']} heads x head_dim {r['head_dim']}, K {r['k_format']}, V {r['v_format']}")
    print(f"  {human_bytes(r['source_bytes'])} in, {human_bytes(r['bytes_on_disk'])} on disk "
          f"({human_bytes(r['apparent_bytes'])} apparent)")
    return 0


def _cmd_upgrade(args) -> int:
    from .tools.common import human_bytes
    from .tools.convert import upgrade

    given = [f"--{o.replace('_', '-')}" for o in (*_CONVERT_DEFAULTS, "name") if getattr(args, o) is not None]
    if args.append:
        given.append("--append")
    if given:
        args.parser.error(f"{', '.join(given)} cannot be used with --upgrade: the new file keeps the old one's "
                          "geometry, formats, fingerprint and names")
    if args.output is None and not args.in_place:
        args.parser.error("--upgrade needs OUTPUT, or --in-place to replace INPUT")
    r = upgrade(args.input, args.output, overwrite=args.overwrite, in_place=args.in_place, progress=_progress(args))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['src']} (format {r['version_before']}) -> {r['dst']} (format {r['version']}): {r['sequences']} "
          f"sequence(s), {r['tokens']} tokens over all layers, K {r['k_format']}, V {r['v_format']}")
    print(f"  largest change  K {r['k_max_error']:.3g}, V {r['v_max_error']:.3g}  (|old - new| over every value)")
    print(f"  on disk         {human_bytes(r['bytes_on_disk_before'])} -> {human_bytes(r['bytes_on_disk_after'])}")
    return 0


def _cmd_demo(args) -> int:
    from .tools.demo import run

    return run(args.workdir)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kvmmap", description="Paged, quantized KV-cache files: demo and tools.")
    parser.add_argument("--version", action="version", version=f"kvmmap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def command(name, help_, func):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func, parser=p)
        return p

    def output_opts(p, progress=True):
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        if progress:
            p.add_argument("--no-progress", action="store_true", help="no progress bar (shown only on a terminal anyway)")

    p = command("inspect", "describe a cache file: geometry, formats, sequences, pages, bytes", _cmd_inspect)
    p.add_argument("file")
    output_opts(p, progress=False)

    p = command("verify", "check header, metadata, page table and every page checksum (exit status 1 on "
                          "damage, 3 if a writer changed pages while they were read: rerun)", _cmd_verify)
    p.add_argument("file")
    p.add_argument("--previous", action="store_true",
                   help="check the commit before the newest (the other metadata slot), e.g. before recovering it "
                        "with PagedKVCache.open(path, commit='previous')")
    output_opts(p)

    p = command("compact", "give the disk blocks of dropped pages back to the file system (commits twice first)",
                _cmd_compact)
    p.add_argument("file")
    output_opts(p, progress=False)

    p = command("compress", "re-encode a cache file into other formats, optionally through a compressor", _cmd_compress)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--k-format", choices=FORMATS, help="format of K in the output (default: the input's)")
    p.add_argument("--v-format", choices=FORMATS, help="format of V in the output (default: the input's)")
    p.add_argument("--method", choices=("none", "lowrank", "vq", "hybrid"), default="none",
                   help="compress and decompress each (sequence, layer) on the way (default: none)")
    p.add_argument("--rank", type=int, help="lowrank/hybrid: latent dimensions per head group "
                                            "(default: from --energy)")
    p.add_argument("--energy", type=float, help="lowrank/hybrid: spectrum fraction to keep without --rank (0.99)")
    p.add_argument("--group-heads", type=int, help="lowrank/hybrid: heads decomposed together (1)")
    p.add_argument("--quant-bits", type=int, choices=(8, 4), help="hybrid: latent quantization (8)")
    p.add_argument("--codebook-size", type=int, help="vq: centroids per codebook (256)")
    p.add_argument("--subvector-dim", type=int, help="vq: elements per sub-vector (4)")
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and the hybrid rotation (0)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    output_opts(p)

    p = command("convert", "store K/V arrays from .npz / .safetensors in a cache file "
                           "('kv' [layers, 2, heads, seq, head_dim] or 'layers.{i}.key' / 'layers.{i}.value'), "
                           "or with --upgrade rewrite a format 1.x cache file in the current format",
                _cmd_convert)
    p.add_argument("input", help=".npz or .safetensors file (with --upgrade: a format 1.x cache file)")
    p.add_argument("output", nargs="?", help="cache file to write (with --upgrade --in-place: leave it out)")
    p.add_argument("--upgrade", action="store_true",
                   help="INPUT is a format 1.x cache file: write it to OUTPUT in the current format, keeping "
                        "geometry, formats, fingerprint, sequence ids, names and contents. fp32, fp16 and bf16 are "
                        "copied exactly; int8, int4 and fp8 are decoded and quantized again, which changes a value "
                        "by at most one quantization step")
    p.add_argument("--k-format", choices=FORMATS, help="format of K (int8)")
    p.add_argument("--v-format", choices=FORMATS, help="format of V (int8)")
    p.add_argument("--page-size", type=int, help="tokens per page (16)")
    p.add_argument("--name", help="sequence name (default: the input file's name); batch rows get /0, /1, ...")
    p.add_argument("--fingerprint", help="model fingerprint stored in the header (up to 32 bytes)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--append", action="store_true", help="add the sequences to an existing cache file")
    mode.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    mode.add_argument("--in-place", action="store_true",
                      help="with --upgrade: replace INPUT (the new file is built beside it, synced, then renamed "
                           "over it)")
    output_opts(p)

    p = command("demo", "run the end-to-end demo on built-in data", _cmd_demo)
    p.add_argument("--workdir", help="where to write the demo's files (default: a temporary folder)")
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + ' '.join(str(e).split()) if str(e) else ''}"
    if isinstance(e, OSError) and not isinstance(e, KVMmapError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .tools.common import ChangedByWriterError

    try:
        return args.func(args)
    except ChangedByWriterError as e:
        print(f"kvmmap {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_CHANGED
    except (KVMmapError, OSError, MemoryError) as e:
        print(f"kvmmap {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"kvmmap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
