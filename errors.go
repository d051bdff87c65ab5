package main

// errors.go: the outcomes of a deploy, as sentinel errors that retry.go
// classifies (final, retryable, a halt), and Docker's answers that decide
// them.

import (
	"errors"

	docker "github.com/fsouza/go-dockerclient"
)

// errUnsupervised: nothing replaced a stopped container; the old one was
// started again. Not a failure of the version: it does not halt.
var errUnsupervised = errors.New("unsupervised")

var (
	// errReplacement: the new version ran and failed (exited, crash-looped,
	// turned unhealthy, or never came up). Only this halts a version.
	errReplacement = errors.New("replacement failed")
	// errNoReplacement: no container at all replaced the stopped one
	// within the bound. The host does not supervise it; the version is
	// not to blame.
	errNoReplacement = errors.New("no replacement appeared")
	// errDockerAway: the Docker daemon stopped answering or restarted
	// during the wait, so the wait could not judge the replacement.
	// Node-local: the deploy is retried, the version never halted.
	errDockerAway = errors.New("the docker daemon went away")
)

var (
	// errBadReference: the trigger names no valid repository or tag.
	errBadReference = errors.New("bad reference")
	// errDigestMismatch: the pull succeeded but the tag is not on the
	// pushed manifest yet (a registry or CDN still serving the previous
	// one). Retryable until digestWait has passed.
	errDigestMismatch = errors.New("pushed digest not pulled yet")
	// errDigestGaveUp: the pushed digest did not appear within digestWait.
	errDigestGaveUp = errors.New("pushed digest never pulled")
)

// errCreateRefused: the runtime refused to create the new container the
// same way twice in a row (a bad option, a missing volume driver, a field
// Podman's create does not take). Nothing was stopped. Final for this
// version on this node: retrying would only be refused again; the
// version is not at fault (it never ran), so it does not halt.
var errCreateRefused = errors.New("create refused")

// errRefused marks a container recreate will not replace. It is final and
// local to this node: retrying will not help, and the version is not at
// fault.
var errRefused = errors.New("recreate refused")

func isConflict(err error) bool {
	var de *docker.Error
	return errors.As(err, &de) && de.Status == 409
}

func isNoSuchContainer(err error) bool {
	var gone *docker.NoSuchContainer
	return errors.As(err, &gone)
}
