package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"

	"github.com/kilnbuild/kiln/sandbox"
)

// Exit codes of `kiln sandbox run` besides the command's own (see docs/sandbox.md).
const (
	exitTimeout        = 124 // the command ran past --timeout and was killed
	exitSandboxFailure = 125 // the sandbox could not be set up
	// 126/127: the command could not be executed / was not found;
	// 128+N: killed by signal N (an OOM kill is 137, reported on stderr).
)

func newSandboxCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "sandbox",
		Short: "Run commands in kiln's build-action sandbox",
	}
	cmd.AddCommand(newSandboxRunCmd())
	return cmd
}

type sandboxRunFlags struct {
	data, rootfs, execRoot, execRootPath, cwd, hostname, cpuset string
	stdout, stderr, memory, tmp                                 string
	binds, envs                                                 []string
	timeout                                                     time.Duration
	pids                                                        int64
	cpus                                                        float64
	openFiles                                                   uint64
	uid, gid                                                    int
	noASLR, reverseEnv, jsonOut                                 bool
}

func newSandboxRunCmd() *cobra.Command {
	var f sandboxRunFlags
	cmd := &cobra.Command{
		Use:   "run --rootfs DIR [flags] -- ARGV...",
		Short: "Run one command in a fresh sandbox and exit with its exit code",
		Long: `Run one command in a fresh, network-less, seccomp-restricted sandbox with DIR as its
read-only root filesystem, then destroy the sandbox.

The environment is exactly the --env flags, in order. Exit status: the command's own;
124 when --timeout killed it; 125 when the sandbox could not be set up; 126/127 when
the command could not be executed or was not found; 128+N when a signal N ended it
(137 for an OOM kill, which is also reported on stderr).`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runSandbox(cmd, f, args)
		},
	}
	fl := cmd.Flags()
	addDataFlag(cmd, &f.data)
	fl.StringVar(&f.rootfs, "rootfs", "", "root filesystem directory, mounted read-only (required)")
	fl.StringArrayVar(&f.binds, "bind", nil, "bind mount SRC:DST[:rw], read-only unless :rw (repeatable)")
	fl.StringVar(&f.execRoot, "exec-root", "", "host directory mounted read-write at --exec-root-path")
	fl.StringVar(&f.execRootPath, "exec-root-path", sandbox.DefaultExecRootPath, "where the exec root appears inside")
	fl.StringVar(&f.cwd, "cwd", "", "working directory inside (relative: to the exec root path)")
	fl.StringArrayVar(&f.envs, "env", nil, "environment entry K=V (repeatable; nothing else is passed)")
	fl.DurationVar(&f.timeout, "timeout", 0, "kill the command after this long (0: no limit)")
	fl.StringVar(&f.memory, "memory", "", "memory limit in bytes (suffixes K, M, G: 1024-based)")
	fl.Int64Var(&f.pids, "pids", 0, fmt.Sprintf("process and thread limit (default %d)", sandbox.DefaultPids))
	fl.Float64Var(&f.cpus, "cpus", 0, "CPU quota in CPUs (0: unlimited)")
	fl.StringVar(&f.cpuset, "cpuset", "", "CPUs the command may use, e.g. 0-1")
	fl.Uint64Var(&f.openFiles, "open-files", 0, fmt.Sprintf("open files limit (default %d)", sandbox.DefaultOpenFiles))
	fl.StringVar(&f.tmp, "tmp-size", "", "size of the private /tmp (default 512M)")
	fl.StringVar(&f.hostname, "hostname", "", "host name inside (default "+sandbox.DefaultHostname+")")
	fl.IntVar(&f.uid, "uid", 0, fmt.Sprintf("uid inside (default %d)", sandbox.DefaultUID))
	fl.IntVar(&f.gid, "gid", 0, fmt.Sprintf("gid inside (default %d)", sandbox.DefaultGID))
	fl.BoolVar(&f.noASLR, "no-aslr", false, "turn address space randomisation off")
	fl.BoolVar(&f.reverseEnv, "reverse-env", false, "pass the environment in reverse order")
	fl.StringVar(&f.stdout, "stdout", "", "write the command's stdout to this file (default: kiln's stdout)")
	fl.StringVar(&f.stderr, "stderr", "", "write the command's stderr to this file (default: kiln's stderr)")
	fl.BoolVar(&f.jsonOut, "json", false, "print the result as JSON on stdout (use with --stdout)")
	return cmd
}

func runSandbox(cmd *cobra.Command, f sandboxRunFlags, args []string) error {
	fail := func(format string, a ...any) error {
		return &exitError{code: exitSandboxFailure, msg: fmt.Sprintf(format, a...)}
	}
	if f.rootfs == "" {
		return &exitError{code: 2, msg: "--rootfs is required"}
	}
	spec := sandbox.Spec{
		RootFS: f.rootfs, ExecRoot: f.execRoot, ExecRootPath: f.execRootPath, Cwd: f.cwd,
		Args: args, Env: f.envs, Timeout: f.timeout, Hostname: f.hostname, UID: f.uid, GID: f.gid,
		CPUs: f.cpuset, DisableASLR: f.noASLR, ReverseEnv: f.reverseEnv,
		Limits: sandbox.Limits{Pids: f.pids, CPUs: f.cpus, OpenFiles: f.openFiles},
		Stdout: sandbox.Output{Path: f.stdout, Limit: -1},
		Stderr: sandbox.Output{Path: f.stderr, Limit: -1},
	}
	if f.stdout == "" {
		spec.Stdout.Writer = os.Stdout
	}
	if f.stderr == "" {
		spec.Stderr.Writer = os.Stderr
	}
	var err error
	if spec.Limits.MemoryBytes, err = parseBytes(f.memory); err != nil {
		return &exitError{code: 2, msg: "--memory: " + err.Error()}
	}
	if spec.Limits.TmpBytes, err = parseBytes(f.tmp); err != nil {
		return &exitError{code: 2, msg: "--tmp-size: " + err.Error()}
	}
	for _, b := range f.binds {
		m, err := parseBind(b)
		if err != nil {
			return &exitError{code: 2, msg: "--bind " + b + ": " + err.Error()}
		}
		spec.Mounts = append(spec.Mounts, m)
	}

	ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	stateRoot := filepath.Join(f.data, "sandbox-cli")
	sweepIdleStateDirs(ctx, stateRoot)
	stateDir := filepath.Join(stateRoot, strconv.Itoa(os.Getpid())+"-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	r, err := sandbox.New(ctx, sandbox.Config{StateDir: stateDir})
	if err != nil {
		return fail("%s", status.Convert(err).Message())
	}
	defer os.RemoveAll(stateDir)
	defer r.Close()

	res, err := r.Run(ctx, spec)
	if err != nil {
		return fail("%s", status.Convert(err).Message())
	}
	if f.jsonOut {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return fail("%v", err)
		}
	}
	switch {
	case res.TimedOut:
		return &exitError{code: exitTimeout, msg: fmt.Sprintf("command timed out after %v and was killed", f.timeout)}
	case res.OOMKilled:
		return &exitError{code: res.ExitCode, msg: "command was killed by the OOM killer (memory limit reached)"}
	case res.StartError != "":
		return &exitError{code: res.ExitCode, msg: res.StartError}
	case res.ExitCode != 0:
		return &exitError{code: res.ExitCode}
	}
	return nil
}

// sweepIdleStateDirs removes the state dirs of earlier `kiln sandbox run` processes
// that died (their lock is free), with whatever they left behind.
func sweepIdleStateDirs(ctx context.Context, root string) {
	ents, err := os.ReadDir(root)
	if err != nil {
		return
	}
	for _, e := range ents {
		dir := filepath.Join(root, e.Name())
		r, err := sandbox.New(ctx, sandbox.Config{StateDir: dir})
		if err != nil {
			continue // in use by a live process, or not ours to clean
		}
		if r.Close() == nil {
			_ = os.RemoveAll(dir)
		}
	}
}

// parseBind parses SRC:DST[:rw] (or :ro).
func parseBind(s string) (sandbox.Mount, error) {
	parts := strings.Split(s, ":")
	m := sandbox.Mount{}
	switch {
	case len(parts) == 3 && (parts[2] == "rw" || parts[2] == "ro"):
		m.Writable = parts[2] == "rw"
	case len(parts) == 2:
	default:
		return m, errors.New("want SRC:DST[:rw]")
	}
	m.Source, m.Target = parts[0], parts[1]
	if m.Source == "" || m.Target == "" {
		return m, errors.New("want SRC:DST[:rw]")
	}
	return m, nil
}

// parseBytes parses a byte count with an optional K, M, G or T suffix (1024-based,
// "Ki"/"KiB"/"KB" accepted); empty means 0 (the default).
func parseBytes(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	t := strings.TrimSuffix(strings.TrimSuffix(strings.ToUpper(strings.TrimSpace(s)), "B"), "I")
	mult := int64(1)
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			mult = 1 << 10
		case 'M':
			mult = 1 << 20
		case 'G':
			mult = 1 << 30
		case 'T':
			mult = 1 << 40
		}
		if mult > 1 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v < 0 || v > (1<<62)/mult {
		return 0, fmt.Errorf("bad byte count %q", s)
	}
	return v * mult, nil
}
