//! The agent as a container (issue 6): the image built with `docker build`, run with exactly
//! the capabilities of deploy/compose.yaml, against the seed scenario.
