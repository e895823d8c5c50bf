from hypothesis import settings

# The lab's root file system is read-only; keep hypothesis' example database in memory.
settings.register_profile("csi-vduse", database=None)
settings.load_profile("csi-vduse")
