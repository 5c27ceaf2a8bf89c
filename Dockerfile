# Multi-stage build of both binaries. Targets:
#   docker build --target fleetd -t fleetd .
#   docker build --target fleet-agent -t fleet-agent .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p fleetd -p fleet-agent

FROM debian:bookworm-slim AS fleet-agent
RUN useradd --system --home /data fleet && mkdir /data && chown fleet /data
COPY --from=build /src/target/release/fleet-agent /usr/local/bin/fleet-agent
USER fleet
WORKDIR /data
ENV FLEET_AGENT_JOURNAL=/data/fleet-agent.journal
VOLUME /data
ENTRYPOINT ["fleet-agent"]

FROM debian:bookworm-slim AS fleetd
RUN useradd --system --home /data fleet && mkdir /data && chown fleet /data
COPY --from=build /src/target/release/fleetd /usr/local/bin/fleetd
USER fleet
WORKDIR /data
ENV FLEETD_BIND=0.0.0.0:8080 FLEETD_DATABASE=/data/fleetd.db
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["fleetd"]
