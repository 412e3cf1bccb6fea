"""What a run of a job still has to make, given what the output folder already holds.

    plan = make_plan(job.items, out.manifest(), out, force=False)
    plan.todo        # to make: not made yet, or its file is missing or not the bytes the manifest recorded
    plan.skipped     # made before and intact: left alone
    plan.changed     # made before from other settings (same id, other fingerprint): an error unless force
    plan.keep        # the manifest lines that stay (one per id)

"Done" means: the manifest has a line for the id, with this request's fingerprint, and ID.png holds the
bytes whose sha256 the line recorded. A file with no manifest line (a crash between the rename and the
append) is made again: the same request and seed give the same bytes, and it gets its line.
"""

from dataclasses import dataclass, field

from .job import Item
from .output import Entry, OutputDir

SHOWN = 20          # changed rows named in the error; the rest are counted


@dataclass
class Plan:
    todo: list[Item] = field(default_factory=list)
    skipped: list[Item] = field(default_factory=list)
    changed: list[tuple[Item, Entry]] = field(default_factory=list)
    redone: list[Item] = field(default_factory=list)        # in todo because the file was missing or broken
    keep: list[Entry] = field(default_factory=list)


def make_plan(items: list[Item], manifest: dict[str, Entry], out: OutputDir, *, force: bool) -> Plan:
    plan = Plan()
    ids = {item.id for item in items}
    plan.keep = [entry for id_, entry in manifest.items() if id_ not in ids]    # other jobs' lines stay
    for item in items:
        entry = manifest.get(item.id)
        if entry is None:
            plan.todo.append(item)
        elif entry.fingerprint != item.fingerprint:
            plan.changed.append((item, entry))
            if force:
                plan.todo.append(item)
            else:
                plan.keep.append(entry)
        elif out.file_matches(entry):
            plan.skipped.append(item)
            plan.keep.append(entry)
        else:
            plan.todo.append(item)
            plan.redone.append(item)
    return plan


def changed_message(changed: list[tuple[Item, Entry]], job_name: str) -> str:
    rows = ", ".join(f"row {item.row} ({item.id})" for item, _ in changed[:SHOWN])
    more = f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else ""
    return (f"{len(changed)} image(s) in the output folder were made from other settings than {job_name} now "
            f"gives the same id: {rows}{more}. The job file, --seed or the checkpoint changed. Use another --out, "
            "give the changed rows new ids, or pass --force to make them again (replacing their files)")
