package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/kilnbuild/kiln/engine"
	"github.com/kilnbuild/kiln/toolchains"
)

// newToolchainCmd is `kiln toolchain`: import, build, list, inspect, export, remove,
// unpack and garbage-collect pinned toolchain images in the data dir.
func newToolchainCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "toolchain",
		Short: "Manage pinned toolchain images (OCI, by manifest digest)",
	}
	cmd.AddCommand(
		newToolchainImportCmd(),
		newToolchainBuildCmd(),
		newToolchainLsCmd(),
		newToolchainInspectCmd(),
		newToolchainExportCmd(),
		newToolchainRmCmd(),
		newToolchainUnpackCmd(),
		newToolchainGCCmd(),
	)
	return cmd
}

// toolchainFlags are the flags every toolchain subcommand shares.
type toolchainFlags struct {
	data    string
	json    bool
	storage engine.StorageConfig // import and build: also share the image through it
}

// addShare registers --storage on a command that makes images (import, build).
func (f *toolchainFlags) addShare(cmd *cobra.Command) {
	cmd.Flags().Var(&f.storage, "storage", "also put the image in this shared storage (s3://...), where every kiln process using it (cluster workers) finds it on first use; see docs/storage.md")
}

// share puts the image d into --storage, if given.
func (f *toolchainFlags) share(ctx context.Context, s *toolchains.Store, d string) error {
	return engine.ShareToolchain(ctx, f.storage, s, d, quietLogger())
}

func (f *toolchainFlags) add(cmd *cobra.Command, withJSON bool) {
	addDataFlag(cmd, &f.data)
	if withJSON {
		cmd.Flags().BoolVar(&f.json, "json", false, "print machine-readable JSON")
	}
}

func (f *toolchainFlags) open(ctx context.Context) (*toolchains.Store, error) {
	// Progress logs stay quiet on the command line: stdout carries results, stderr errors.
	s, err := toolchains.Open(ctx, f.data, toolchains.Options{Logger: quietLogger()})
	return s, statusErr(err)
}

// withStore makes c a subcommand with f's flags that runs run on the opened toolchain
// store; run's gRPC errors become plain one-line errors.
func (f *toolchainFlags) withStore(c *cobra.Command, withJSON bool, run func(ctx context.Context, c *cobra.Command, s *toolchains.Store, args []string) error) *cobra.Command {
	c.RunE = func(c *cobra.Command, args []string) error {
		s, err := f.open(c.Context())
		if err != nil {
			return err
		}
		return statusErr(run(c.Context(), c, s, args))
	}
	f.add(c, withJSON)
	return c
}

func newToolchainImportCmd() *cobra.Command {
	var (
		f      toolchainFlags
		name   string
		unpack bool
	)
	cmd := f.withStore(&cobra.Command{
		Use:   "import PATH",
		Short: "Verify and store an OCI image layout, OCI archive or docker-save tar; print its manifest digest",
		Args:  cobra.ExactArgs(1),
	}, true, func(ctx context.Context, cmd *cobra.Command, s *toolchains.Store, args []string) error {
		imgs, err := s.Import(ctx, args[0], toolchains.ImportOptions{Name: name})
		if err != nil {
			return err
		}
		for _, img := range imgs {
			if err := f.share(ctx, s, img.Digest.String()); err != nil {
				return err
			}
		}
		if unpack {
			for _, img := range imgs {
				if _, err := s.RootFS(ctx, img); err != nil {
					return err
				}
			}
		}
		if f.json {
			return printJSON(cmd.OutOrStdout(), imgs)
		}
		for _, img := range imgs {
			fmt.Fprintln(cmd.OutOrStdout(), img.Digest)
		}
		return nil
	})
	cmd.Flags().StringVar(&name, "name", "", "informational NAME[:TAG] to record for the image")
	cmd.Flags().BoolVar(&unpack, "unpack", false, "also unpack the root filesystem now (instead of on first use)")
	f.addShare(cmd)
	return cmd
}

func newToolchainBuildCmd() *cobra.Command {
	var (
		f      toolchainFlags
		rootfs string
		name   string
		arch   string
	)
	cmd := &cobra.Command{
		Use:   "build --rootfs DIR [--name NAME[:TAG]]",
		Short: "Make a deterministic single-layer OCI image of a directory; print its manifest digest",
		Long: "Make a single-layer OCI image of a directory, deterministically: the same tree gives the same\n" +
			"digest on any machine (sorted entries, uid/gid 0, mtimes from SOURCE_DATE_EPOCH or 0,\n" +
			"no extended attributes, an uncompressed layer, a fixed config).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if rootfs == "" {
				return &exitError{code: 2, msg: "build: --rootfs DIR is required"}
			}
			var epoch int64
			if v := os.Getenv("SOURCE_DATE_EPOCH"); v != "" {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil || n < 0 {
					return fmt.Errorf("build: SOURCE_DATE_EPOCH=%q is not a non-negative integer", v)
				}
				epoch = n
			}
			ctx := cmd.Context()
			s, err := f.open(ctx)
			if err != nil {
				return err
			}
			img, err := s.Build(ctx, rootfs, toolchains.BuildOptions{Name: name, Epoch: epoch, Architecture: arch})
			if err != nil {
				return statusErr(err)
			}
			if err := f.share(ctx, s, img.Digest.String()); err != nil {
				return statusErr(err)
			}
			if f.json {
				return printJSON(cmd.OutOrStdout(), img)
			}
			fmt.Fprintln(cmd.OutOrStdout(), img.Digest)
			return nil
		},
	}
	f.add(cmd, true)
	f.addShare(cmd)
	cmd.Flags().StringVar(&rootfs, "rootfs", "", "directory to turn into an image")
	cmd.Flags().StringVar(&name, "name", "", "informational NAME[:TAG] to record for the image")
	cmd.Flags().StringVar(&arch, "arch", "", "architecture recorded in the image config (default: this host's)")
	return cmd
}

func newToolchainLsCmd() *cobra.Command {
	var f toolchainFlags
	return f.withStore(&cobra.Command{
		Use:   "ls",
		Short: "List stored toolchain images",
		Args:  cobra.NoArgs,
	}, true, func(ctx context.Context, cmd *cobra.Command, s *toolchains.Store, _ []string) error {
		ents, err := s.List(ctx)
		if err != nil {
			return err
		}
		if f.json {
			if ents == nil {
				ents = []toolchains.Entry{}
			}
			return printJSON(cmd.OutOrStdout(), ents)
		}
		tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "DIGEST\tSIZE\tPLATFORM\tUNPACKED\tNAMES")
		for _, e := range ents {
			unpacked := "no"
			if e.RootFS != "" {
				unpacked = "yes"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s/%s\t%s\t%s\n", e.Digest, humanSize(e.Size), e.Platform.OS, e.Platform.Architecture, unpacked, strings.Join(e.Names, ","))
		}
		return tw.Flush()
	})
}

func newToolchainInspectCmd() *cobra.Command {
	var f toolchainFlags
	return f.withStore(&cobra.Command{
		Use:   "inspect REF",
		Short: "Show a stored toolchain image (REF: [docker://]NAME@sha256:HEX or sha256:HEX)",
		Args:  cobra.ExactArgs(1),
	}, true, func(ctx context.Context, cmd *cobra.Command, s *toolchains.Store, args []string) error {
		e, err := s.Inspect(ctx, args[0])
		if err != nil {
			return err
		}
		if f.json {
			return printJSON(cmd.OutOrStdout(), e)
		}
		w := cmd.OutOrStdout()
		fmt.Fprintf(w, "digest:    %s\n", e.Digest)
		fmt.Fprintf(w, "mediaType: %s\n", e.MediaType)
		fmt.Fprintf(w, "platform:  %s/%s\n", e.Platform.OS, e.Platform.Architecture)
		fmt.Fprintf(w, "size:      %s (%d bytes)\n", humanSize(e.Size), e.Size)
		fmt.Fprintf(w, "names:     %s\n", strings.Join(e.Names, ", "))
		fmt.Fprintf(w, "config:    %s\n", e.Config.Digest)
		for i, l := range e.Layers {
			fmt.Fprintf(w, "layer %d:   %s %s (%s)\n", i+1, l.Digest, humanSize(l.Size), l.MediaType)
		}
		rootfs := e.RootFS
		if rootfs == "" {
			rootfs = "(not unpacked)"
		}
		fmt.Fprintf(w, "rootfs:    %s\n", rootfs)
		return nil
	})
}

func newToolchainExportCmd() *cobra.Command {
	var f toolchainFlags
	return f.withStore(&cobra.Command{
		Use:   "export REF DEST",
		Short: "Write an image as an OCI layout directory (or an OCI archive if DEST ends in .tar)",
		Args:  cobra.ExactArgs(2),
	}, false, func(ctx context.Context, _ *cobra.Command, s *toolchains.Store, args []string) error {
		return s.Export(ctx, args[0], args[1])
	})
}

func newToolchainRmCmd() *cobra.Command {
	var f toolchainFlags
	return f.withStore(&cobra.Command{
		Use:   "rm REF...",
		Short: "Forget toolchain images (their disk space is freed by `kiln toolchain gc`)",
		Args:  cobra.MinimumNArgs(1),
	}, false, func(ctx context.Context, cmd *cobra.Command, s *toolchains.Store, args []string) error {
		for _, ref := range args {
			img, err := s.Remove(ctx, ref)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), img.Digest)
		}
		return nil
	})
}

func newToolchainUnpackCmd() *cobra.Command {
	var f toolchainFlags
	return f.withStore(&cobra.Command{
		Use:   "unpack REF",
		Short: "Unpack an image's read-only root filesystem (if not yet) and print its directory",
		Args:  cobra.ExactArgs(1),
	}, false, func(ctx context.Context, cmd *cobra.Command, s *toolchains.Store, args []string) error {
		img, err := s.Resolve(ctx, args[0])
		if err != nil {
			return err
		}
		dir, err := s.RootFS(ctx, img)
		if err != nil {
			return err
		}
		fmt.Fprintln(cmd.OutOrStdout(), dir)
		return nil
	})
}

func newToolchainGCCmd() *cobra.Command {
	var f toolchainFlags
	return f.withStore(&cobra.Command{
		Use:   "gc",
		Short: "Remove unpacked roots, blobs and leftovers no stored image references",
		Args:  cobra.NoArgs,
	}, true, func(ctx context.Context, cmd *cobra.Command, s *toolchains.Store, _ []string) error {
		st, err := s.GC(ctx)
		if err != nil {
			return err
		}
		if f.json {
			return printJSON(cmd.OutOrStdout(), st)
		}
		fmt.Fprintf(cmd.OutOrStdout(), "removed %d roots, %d blobs (%s), %d staging leftovers\n",
			st.Roots, st.Blobs, humanSize(st.BlobBytes), st.Staging)
		if st.InUse > 0 {
			fmt.Fprintf(cmd.OutOrStdout(), "kept %d roots of removed images that a running kiln still mounts; run gc again once it is done\n", st.InUse)
		}
		return nil
	})
}

// humanSize formats a byte count with a binary unit.
func humanSize(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
