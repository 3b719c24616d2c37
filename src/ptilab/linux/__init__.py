"""The modelled Linux kernel: layout profiles, cpu_entry_area, boot and CPU hotplug."""
