"""What a conversion did, shown as a rich table on a terminal or as JSON for CI (``--json``)."""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field


@dataclass
class ConvertReport:
    source: str
    destination: str
    manifest_digest: str = ""
    tagged_digest: str = ""            # what the tag points at (index digest with --with-oci-fallback)
    layers: int = 0
    input_compressed_bytes: int = 0    # source layer blobs as stored
    input_bytes: int = 0               # uncompressed tar bytes read
    file_bytes: int = 0                # regular-file content in the input layers
    files: int = 0
    chunks_seen: int = 0
    chunks_stored: int = 0
    chunks_deduped: int = 0
    chunks_reused: int = 0             # from the chunk dictionary
    bytes_deduped: int = 0
    bytes_reused: int = 0
    blobs: int = 0
    output_bytes: int = 0              # all layer blobs of the remora manifest (incl. reused ones)
    new_blob_bytes: int = 0            # blobs this conversion wrote
    bootstrap_bytes: int = 0
    uploaded_bytes: int = 0            # bytes actually sent to the destination
    mounted_blobs: int = 0
    seconds: float = 0.0
    chunking: str = ""
    prefetch_files: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def dedup_ratio(self) -> float:
        """Fraction of input chunk bytes not stored again (in-image dedup + dictionary reuse)."""
        seen = self.bytes_deduped + self.bytes_reused + self._stored
        return (self.bytes_deduped + self.bytes_reused) / seen if seen else 0.0

    @property
    def _stored(self) -> int:
        return self.file_bytes - self.bytes_deduped - self.bytes_reused

    @property
    def throughput_mb_s(self) -> float:
        return self.input_bytes / 1e6 / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dedup_ratio"] = round(self.dedup_ratio, 4)
        d["throughput_mb_s"] = round(self.throughput_mb_s, 1)
        return d

    def print(self, as_json: bool = False, file=None) -> None:
        file = file or sys.stdout
        if as_json:
            print(json.dumps(self.to_dict(), indent=2, sort_keys=True), file=file)
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"remora convert: {self.source} -> {self.destination}", show_header=True)
        t.add_column("")
        t.add_column("value", justify="right")
        rows = [
            ("input (compressed layers)", human(self.input_compressed_bytes)),
            ("input (uncompressed)", human(self.input_bytes)),
            ("output (all blobs)", human(self.output_bytes)),
            ("  of which bootstrap", human(self.bootstrap_bytes)),
            ("new blob bytes", human(self.new_blob_bytes)),
            ("bytes uploaded", human(self.uploaded_bytes)),
            ("blobs mounted/reused", str(self.mounted_blobs)),
            ("files", f"{self.files:,}"),
            ("chunks (seen / stored)", f"{self.chunks_seen:,} / {self.chunks_stored:,}"),
            ("dedup in image / from dict", f"{human(self.bytes_deduped)} / {human(self.bytes_reused)}"),
            ("dedup ratio", f"{self.dedup_ratio:.1%}"),
            ("chunking", self.chunking),
            ("prefetch files", str(self.prefetch_files)),
            ("time", f"{self.seconds:.2f} s"),
            ("throughput", f"{self.throughput_mb_s:.1f} MB/s"),
        ]
        for k, v in rows:
            t.add_row(k, v)
        Console(file=file).print(t)
        # digests are 71 characters: in the table an 80-column terminal cut them short, and a
        # digest is only useful whole (copied into a pull or a check), so they go on lines of their own
        print(f"manifest: {self.manifest_digest}", file=file)
        if self.tagged_digest and self.tagged_digest != self.manifest_digest:
            print(f"index (with OCI fallback): {self.tagged_digest}", file=file)


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
