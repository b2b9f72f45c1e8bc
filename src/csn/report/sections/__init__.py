"""The sections of the report page, one module each, registered with `csn.report.page.section` (found by the
registry: a new module here is a new section, with no import line elsewhere)."""
