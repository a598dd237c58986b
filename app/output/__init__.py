"""The output dataset: everything about what a run writes to output.path, and how it is read back.

- dataset: the layout, the settings a run resumes with, preparing output.path, writing its files whole
  (a full disk leaves nothing half-written), the manifest (which says the dataset is complete), reading
  committed rows. The row schema and its error kinds are app.result_schema's, which the input side shares.
- rows: detections (and error rows) turned into result rows.
- writer: committing rows file by file.
- lease: one run at a time on an output.path: numbered leases, and the fence against a run that lost its own.
- resume: what an output.path already holds, counted by Ray tasks.
- reader: a finished results directory, for the report, export and evaluate commands.
"""
