// Command reference is the physical limit of a deployer on one node, for
// the benchmarks (bench_reference_test.go): the least Engine API sequence
// that puts a new version of an image into a container, with nothing
// else. It reads one line per update from stdin, performs the update and
// answers on stdout with "ok" or "error: ...":
//
//	recreate: pull, stop, remove, create, start (what `docker run` does,
//	          without the CLI's process start-ups)
//	stop:     pull, stop; the container's supervisor (scripts/supervise.sh)
//	          brings it back on the new image
//
// It knows the container's name and configuration beforehand, so it
// inspects and lists nothing. It is a long-running process with one
// Docker client, like the deployer, so that neither pays a start-up.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	docker "github.com/fsouza/go-dockerclient"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "reference:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("reference", flag.ContinueOnError)
	host := fs.String("docker", "unix:///var/run/docker.sock", "Docker endpoint")
	strategy := fs.String("strategy", "recreate", "recreate or stop")
	name := fs.String("name", "app", "container name")
	image := fs.String("image", "", "image reference (repository:tag)")
	stopTimeout := fs.Uint("stop_timeout", 3, "seconds before a stop kills")
	if err := fs.Parse(args); err != nil {
		return err
	}
	i := strings.LastIndexByte(*image, ':')
	if i < 0 || strings.Contains((*image)[i:], "/") {
		return errors.New("-image must be repository:tag")
	}
	repo, tag := (*image)[:i], (*image)[i+1:]
	if *strategy != "recreate" && *strategy != "stop" {
		return fmt.Errorf("-strategy %q: recreate or stop", *strategy)
	}
	c, err := docker.NewClient(*host)
	if err != nil {
		return err
	}
	update := func(ctx context.Context) error {
		if err := c.PullImage(docker.PullImageOptions{Repository: repo, Tag: tag, Context: ctx}, docker.AuthConfiguration{}); err != nil {
			return fmt.Errorf("pull: %w", err)
		}
		if err := c.StopContainerWithContext(*name, *stopTimeout, ctx); err != nil {
			return fmt.Errorf("stop: %w", err)
		}
		if *strategy == "stop" {
			return nil // the supervisor runs the tag again
		}
		if err := c.RemoveContainer(docker.RemoveContainerOptions{ID: *name, Context: ctx}); err != nil {
			return fmt.Errorf("remove: %w", err)
		}
		ctr, err := c.CreateContainer(docker.CreateContainerOptions{
			Name:       *name,
			Config:     &docker.Config{Image: *image},
			HostConfig: &docker.HostConfig{NetworkMode: "none"},
			Context:    ctx,
		})
		if err != nil {
			return fmt.Errorf("create: %w", err)
		}
		if err := c.StartContainerWithContext(ctr.ID, nil, ctx); err != nil {
			return fmt.Errorf("start: %w", err)
		}
		return nil
	}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		err := update(ctx)
		cancel()
		if err != nil {
			fmt.Println("error:", err)
			continue
		}
		fmt.Println("ok")
	}
	return in.Err()
}
