package main

// clone.go: the configuration of a re-created container: the old
// container's, on the new image, with the image's own defaults left to
// the new image.

import (
	"maps"
	"reflect"
	"slices"
	"strings"

	docker "github.com/fsouza/go-dockerclient"
)

// composeImageLabel is where docker compose records the image ID a
// container was created from; compose re-creates a container whose value
// differs from the service's current image.
const composeImageLabel = "com.docker.compose.image"

// cloneConfig copies a container's configuration for a new container of
// the same tag on image newID, leaving out what came from the old image
// (defaults) and what Docker fills in per container.
//
// Everything the container was given at create time is kept: env, labels,
// command and entrypoint overrides, user, working directory, hostname,
// healthcheck, stop signal and timeout (Config); restart policy, network
// mode, binds, mounts, tmpfs, ulimits, capabilities, devices, log
// configuration and resource limits (HostConfig, copied whole). Volumes
// are re-attached by name at the same paths (see keepVolumes), so that an
// anonymous volume (`-v /path`, an image VOLUME) keeps its data.
//
// What Podman's inspect reports in a form its create refuses is put in
// the form it takes: ulimits (ulimitNames) and device permissions
// (devicePermissions); environment the runtime added is left out
// (runtimeAddedEnv). What Podman's Docker API does not report cannot be
// copied: log options, a device's permissions, the umask (README,
// "Podman").
func cloneConfig(old *docker.Container, defaults *docker.Config, newID string) (*docker.Config, *docker.HostConfig, *docker.NetworkingConfig) {
	cfg := *old.Config
	if defaults == nil {
		defaults = &docker.Config{}
	}
	runtimeEnv := runtimeAddedEnv(cfg.Env, cfg.Hostname, old.ID)
	if cfg.Hostname == shortID(old.ID) || strings.HasPrefix(old.ID, cfg.Hostname) {
		cfg.Hostname = "" // Docker's default: the new container's ID
	}
	cfg.Env = slices.DeleteFunc(slices.Clone(cfg.Env), func(e string) bool {
		return slices.Contains(defaults.Env, e) || slices.Contains(runtimeEnv, e)
	})
	labels := maps.Clone(cfg.Labels)
	for k, v := range defaults.Labels {
		if labels[k] == v {
			delete(labels, k)
		}
	}
	if _, ok := labels[composeImageLabel]; ok && newID != "" {
		labels[composeImageLabel] = newID
	}
	cfg.Labels = labels
	if slices.Equal(cfg.Cmd, defaults.Cmd) {
		cfg.Cmd = nil
	}
	if slices.Equal(cfg.Entrypoint, defaults.Entrypoint) {
		cfg.Entrypoint = nil
	}
	if cfg.WorkingDir == defaults.WorkingDir {
		cfg.WorkingDir = ""
	}
	if cfg.User == defaults.User {
		cfg.User = ""
	}
	if maps.Equal(cfg.ExposedPorts, defaults.ExposedPorts) {
		cfg.ExposedPorts = nil
	}
	if maps.Equal(cfg.Volumes, defaults.Volumes) {
		cfg.Volumes = nil
	}
	// Only a healthcheck equal to the image's in every field is the
	// image's: `--health-interval` alone overrides just the interval.
	if defaults.Healthcheck != nil && cfg.Healthcheck != nil && reflect.DeepEqual(*cfg.Healthcheck, *defaults.Healthcheck) {
		cfg.Healthcheck = nil
	}
	if cfg.StopSignal == defaults.StopSignal {
		cfg.StopSignal = ""
	}
	var host *docker.HostConfig
	if old.HostConfig != nil {
		h := *old.HostConfig
		h.Binds, h.Mounts = keepVolumes(old.Mounts, h.Binds, h.Mounts, h.VolumeDriver)
		h.Ulimits = ulimitNames(h.Ulimits)
		h.Devices = devicePermissions(h.Devices)
		host = &h
	}
	var netcfg *docker.NetworkingConfig
	if old.NetworkSettings != nil && host != nil && !isBuiltinNetwork(host.NetworkMode) {
		netcfg = &docker.NetworkingConfig{EndpointsConfig: map[string]*docker.EndpointConfig{}}
		for name, n := range old.NetworkSettings.Networks {
			// Docker adds the short ID as an alias; it would be wrong.
			aliases := slices.DeleteFunc(slices.Clone(n.Aliases), func(a string) bool { return strings.HasPrefix(old.ID, a) })
			netcfg.EndpointsConfig[name] = &docker.EndpointConfig{Aliases: aliases}
		}
	}
	return &cfg, host, netcfg
}

// podmanEnv is the variable Podman sets in every container it runs (and
// only Podman): it tells the runtime.
const podmanEnv = "container=podman"

// runtimeAddedEnv returns the entries of env that the runtime added, to be
// left out of a copy as the image's are, since the runtime adds them again
// for the new container: Podman's HOSTNAME=<hostname> when the hostname is
// its default (the container's ID: copied, the new container would claim
// the old one's ID), and, on Podman, container=podman and the TERM=xterm
// of its containers.conf.
func runtimeAddedEnv(env []string, hostname, id string) []string {
	var out []string
	if hostname != "" && strings.HasPrefix(id, hostname) {
		out = append(out, "HOSTNAME="+hostname)
	}
	if slices.Contains(env, podmanEnv) {
		out = append(out, podmanEnv, "TERM=xterm")
	}
	return out
}

// ulimitNames returns ulimits under the names create accepts: Podman's
// inspect reports the kernel's (RLIMIT_NOFILE), Docker's and Podman's
// create take only Docker's (nofile), which are the same lowercased
// without the prefix.
func ulimitNames(ulimits []docker.ULimit) []docker.ULimit {
	out := slices.Clone(ulimits)
	for i, u := range out {
		if rest, ok := strings.CutPrefix(u.Name, "RLIMIT_"); ok {
			out[i].Name = strings.ToLower(rest)
		}
	}
	return out
}

// devicePermissions returns devices with their cgroup permissions: Podman's
// inspect reports none (""), which its create refuses; "rwm" is what
// both runtimes give a device when none are named.
func devicePermissions(devices []docker.Device) []docker.Device {
	out := slices.Clone(devices)
	for i, d := range out {
		if d.CgroupPermissions == "" {
			out[i].CgroupPermissions = "rwm"
		}
	}
	return out
}

// keepVolumes returns binds and mounts that attach every volume the old
// container mounted (mounts, from inspect) to the same path: named volumes
// already are; an anonymous one (`-v /path`, `--mount type=volume` without
// a source, an image VOLUME) would be a new empty volume in the new
// container, so it is attached by its generated name, read-only if it
// was, with its driver.
func keepVolumes(mounts []docker.Mount, binds []string, hostMounts []docker.HostMount, volumeDriver string) ([]string, []docker.HostMount) {
	binds = slices.Clone(binds)
	hostMounts = slices.Clone(hostMounts)
	byDest := map[string]docker.Mount{}
	for _, m := range mounts {
		if m.Name != "" { // only volumes have a name
			byDest[m.Destination] = m
		}
	}
	covered := map[string]bool{}
	for _, b := range binds {
		if dst, ok := bindDestination(b); ok {
			covered[dst] = true
		}
	}
	for i, hm := range hostMounts {
		covered[hm.Target] = true
		if hm.Type == "volume" && hm.Source == "" {
			if m, ok := byDest[hm.Target]; ok {
				hostMounts[i].Source = m.Name
			}
		}
	}
	dests := slices.Sorted(maps.Keys(byDest))
	for _, dst := range dests {
		if covered[dst] {
			continue
		}
		m := byDest[dst]
		if m.Driver != "" && m.Driver != "local" && m.Driver != volumeDriver {
			// Only a mount can name the driver of one volume.
			hostMounts = append(hostMounts, docker.HostMount{
				Type: "volume", Source: m.Name, Target: dst, ReadOnly: !m.RW,
				VolumeOptions: &docker.VolumeOptions{DriverConfig: docker.VolumeDriverConfig{Name: m.Driver}},
			})
			continue
		}
		opts := []string{}
		if !m.RW {
			opts = append(opts, "ro")
		}
		for o := range strings.SplitSeq(m.Mode, ",") {
			if o == "z" || o == "Z" || o == "nocopy" {
				opts = append(opts, o)
			}
		}
		b := m.Name + ":" + dst
		if len(opts) > 0 {
			b += ":" + strings.Join(opts, ",")
		}
		binds = append(binds, b)
	}
	return binds, hostMounts
}

// bindDestination returns the container path of a bind (`src:dst[:opts]`
// or, rare, `dst` alone).
func bindDestination(b string) (string, bool) {
	parts := strings.Split(b, ":")
	switch len(parts) {
	case 1:
		return parts[0], parts[0] != ""
	case 2, 3:
		return parts[1], parts[1] != ""
	}
	return "", false
}

func isBuiltinNetwork(mode string) bool {
	return mode == "" || mode == "default" || mode == "bridge" || mode == "host" || mode == "none" || strings.HasPrefix(mode, "container:")
}
