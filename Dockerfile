# container-guard as a container: the static `guard` binary and nothing else.
#
# Build it with `cargo xtask image` (tags container-guard:dev): that builds guard statically
# (glibc, crt-static), leaves it at target/image/guard and runs `docker build` here with the
# repository root as the context; .dockerignore keeps everything but that one file out of it.
# Nothing is pulled: FROM scratch needs no registry.
#
# Run it with host networking, the Docker socket read-only, bpffs from the host and one
# capability; README.md ("Run it as a container") explains each flag:
#
#   docker run -d --name container-guard --restart unless-stopped \
#     --network host --cap-drop ALL --cap-add SYS_ADMIN --read-only \
#     --security-opt no-new-privileges:true \
#     -v /var/run/docker.sock:/var/run/docker.sock:ro -v /sys/fs/bpf:/sys/fs/bpf \
#     -v /etc/container-guard:/etc/container-guard:ro \
#     -v /var/lib/container-guard:/var/lib/container-guard \
#     container-guard:dev run --metrics-addr 127.0.0.1:9184
FROM scratch
COPY target/image/guard /guard
LABEL org.opencontainers.image.title="container-guard" \
      org.opencontainers.image.description="XDP filter and agent that stop Docker from exposing container ports to the network" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# Root in the container, but with only the capabilities the run command grants: Docker gives
# a non-root user no effective capabilities at all (it sets no ambient ones).
USER 0:0
ENTRYPOINT ["/guard"]
CMD ["--help"]
