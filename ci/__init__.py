"""kernel-ci: build patched Linux kernels reproducibly, cache them by their inputs, boot them in QEMU
and turn what the guest ran into JUnit XML."""
