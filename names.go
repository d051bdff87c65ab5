package main

// names.go: image and repository names: parsing, the registry of bare
// names, and the local tags containers run.

import (
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"

	"github.com/distribution/reference"
)

// dockerHub is the domain that github.com/distribution/reference gives to
// Docker Hub names.
const dockerHub = "docker.io"

// registryHost turns the -registry flag into the domain that bare
// repository names belong to: "" and Docker Hub's index URL give
// "docker.io"; "host:port" and "https://host:port/v2/" give "host:port".
func registryHost(s string) (string, error) {
	if s == "" {
		return dockerHub, nil
	}
	host := s
	if strings.Contains(s, "://") {
		u, err := url.Parse(s)
		if err != nil {
			return "", fmt.Errorf("%q: %w", s, err)
		}
		host = u.Host
	} else if i := strings.IndexByte(s, '/'); i >= 0 {
		host = s[:i]
	}
	switch host {
	case "":
		return "", fmt.Errorf("%q names no registry host", s)
	case "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com", "docker.io":
		return dockerHub, nil
	}
	// The reference grammar checks host[:port] for us.
	if _, err := reference.ParseNamed(host + "/x"); err != nil {
		return "", fmt.Errorf("%q is not a registry host: %w", s, err)
	}
	return host, nil
}

// errBadRepo is wrapped by every rejection of a repository name.
var errBadRepo = errors.New("invalid repository name")

// checkRepoName accepts a repository name as a webhook may send it:
// "myorg/foo", "foo", "host:5000/team/app". It rejects tags, digests,
// upper case, "..", "*", reserved names and everything else that is not a
// repository.
func checkRepoName(name string) error {
	if name == "" {
		return fmt.Errorf("%w: empty", errBadRepo)
	}
	if len(name) > 255 {
		return fmt.Errorf("%w: longer than 255 characters", errBadRepo)
	}
	if name != strings.ToLower(name) {
		return fmt.Errorf("%w: %q must be lower case", errBadRepo, name)
	}
	if strings.HasPrefix(name, "_") || strings.Contains(name, "..") || strings.Contains(name, "//") {
		return fmt.Errorf("%w: %q", errBadRepo, name)
	}
	named, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return fmt.Errorf("%w: %q: %w", errBadRepo, name, err)
	}
	if !reference.IsNameOnly(named) {
		return fmt.Errorf("%w: %q carries a tag or digest", errBadRepo, name)
	}
	return nil
}

// hasDomain reports whether a repository name starts with a registry host,
// using the same rule as the reference library: the first component holds
// a dot or a colon, or is "localhost".
func hasDomain(name string) bool {
	i := strings.IndexByte(name, '/')
	if i <= 0 {
		return false
	}
	first := name[:i]
	return strings.ContainsAny(first, ".:") || first == "localhost"
}

// resolveRepo maps a repository name from a webhook or etcd key to the
// repository that local tags are compared with. Bare names ("myorg/foo")
// belong to the -registry host; names with a host stay as they are.
func resolveRepo(name, registry string) (reference.Named, error) {
	if err := checkRepoName(name); err != nil {
		return nil, err
	}
	if !hasDomain(name) && registry != dockerHub {
		name = registry + "/" + name
	}
	named, err := reference.ParseNormalizedNamed(name)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", errBadRepo, name, err)
	}
	return named, nil
}

// localTag parses a RepoTags entry of a local image. It reports false for
// "<none>:<none>" and anything else that is not repo:tag.
func localTag(repoTag string) (reference.NamedTagged, bool) {
	named, err := reference.ParseNormalizedNamed(repoTag)
	if err != nil {
		return nil, false
	}
	tagged, ok := named.(reference.NamedTagged)
	return tagged, ok
}

var hexID = regexp.MustCompile(`^(sha256:)?[0-9a-f]{12,64}$`)

// containerRef parses the image reference a container was created with
// (Config.Image). It reports false when the container was started by
// digest or by image ID, which must never be touched: only a tag can move.
// imageID is the container's image ID, to recognise short-ID starts.
func containerRef(configImage, imageID string) (reference.NamedTagged, bool) {
	if configImage == "" {
		return nil, false
	}
	if hexID.MatchString(configImage) && strings.HasPrefix(strings.TrimPrefix(imageID, "sha256:"), strings.TrimPrefix(configImage, "sha256:")) {
		return nil, false
	}
	named, err := reference.ParseNormalizedNamed(configImage)
	if err != nil {
		return nil, false
	}
	if _, ok := named.(reference.Digested); ok {
		return nil, false
	}
	tagged, ok := reference.TagNameOnly(named).(reference.NamedTagged)
	return tagged, ok
}

// shortID gives the 12 hex digits that docker shows for an image ID.
func shortID(id string) string {
	id = strings.TrimPrefix(id, "sha256:")
	if len(id) > 12 {
		id = id[:12]
	}
	if id == "" {
		return "none"
	}
	return id
}

// checkTag accepts "" (no tag named) and valid tags.
func checkTag(tag string) error {
	if tag == "" {
		return nil
	}
	if _, err := reference.WithTag(tagCheckRepo, tag); err != nil {
		return fmt.Errorf("%q is not a valid tag", tag)
	}
	return nil
}

// checkDigest accepts "" and valid digests ("sha256:" and 64 hex digits).
func checkDigest(d string) error {
	if d == "" {
		return nil
	}
	ref, err := reference.Parse("x@" + d)
	if _, ok := ref.(reference.Digested); err != nil || !ok {
		return fmt.Errorf("%q is not a valid digest", d)
	}
	return nil
}

var tagCheckRepo, _ = reference.WithName("x")

// familiar is a canonical reference as people write it.
func familiar(s string) string {
	if n, err := reference.ParseNormalizedNamed(s); err == nil {
		return reference.FamiliarString(n)
	}
	return s
}
