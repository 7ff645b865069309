package cli

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/ukai-storage/ukai/api"

	"github.com/ukai-storage/ukai/node/diffstream"
)

func (a *app) imageExportDiffCmd() *cobra.Command {
	var from string
	cmd := &cobra.Command{
		Use:   "export-diff [--from-snap SNAP] IMAGE@SNAP FILE",
		Short: "Write the blocks changed since --from-snap (or all the snapshot's data) to FILE (or - for stdout), rbd's export-diff format",
		Long: "Write the changes between two snapshots of an image (--from-snap S1, then IMAGE@S2) to FILE, or without\n" +
			"--from-snap the snapshot's data (holes left out). Only the blocks changed in between are read and sent, so\n" +
			"backups of large images are incremental. The stream is rbd's export-diff format, version 1\n" +
			"(docs/images.md); 'ukai image import-diff' applies it.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) (err error) {
			var out io.Writer = a.out
			if args[1] != "-" {
				var f *os.File
				if f, err = os.OpenFile(args[1], os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600); err != nil {
					return err
				}
				defer func() {
					if cerr := f.Close(); err == nil {
						err = cerr
					}
					if err != nil {
						os.Remove(args[1])
					}
				}()
				out = f
			}
			pr, pw := io.Pipe()
			copied := make(chan error, 1)
			// The stream is read back as it comes (checked record by
			// record, its end record required) and written out again:
			// progress follows the offsets, and a cut is an error.
			go func() {
				copied <- copyDiff(pr, out, func(size int64) *progress {
					return newProgress(cmd.ErrOrStderr(), "export-diff "+args[0], "bytes", size)
				})
				pr.Close()
			}()
			err = a.client().ReadDiff(cmd.Context(), args[0], from, func() {}, pw)
			pw.CloseWithError(err)
			// The reading side's error says more than the pipe it closed.
			if cerr := <-copied; cerr != nil && (err == nil || errors.Is(err, io.ErrClosedPipe)) {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("export-diff %s: %w", args[0], err)
			}
			if f, ok := out.(*os.File); ok && f != os.Stdout {
				return f.Sync()
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&from, "from-snap", "", "the older snapshot of the same image (its own name): only what changed since is written")
	return cmd
}

// copyDiff reads a diff stream from r and writes it to w, record by
// record, drawing progress against the image's size.
func copyDiff(r io.Reader, w io.Writer, bar func(size int64) *progress) error {
	dr, err := diffstream.NewReader(r)
	if err != nil {
		return err
	}
	dw, err := diffstream.NewWriter(w, dr.From, dr.To, dr.Size)
	if err != nil {
		return err
	}
	p := bar(dr.Size)
	defer p.finish()
	for {
		rec, err := dr.Next()
		if errors.Is(err, io.EOF) {
			p.set(dr.Size)
			return dw.End()
		}
		if err != nil {
			return err
		}
		if rec.Kind == 'w' {
			if err = dw.DataFrom(rec.Off, rec.Len, rec.Data); errors.Is(err, io.EOF) {
				err = fmt.Errorf("%w: the stream ends inside a data record", diffstream.ErrMalformed)
			}
		} else {
			err = dw.Zero(rec.Off, rec.Len)
		}
		if err != nil {
			return err
		}
		p.set(rec.Off + rec.Len)
	}
}

func (a *app) imageImportDiffCmd() *cobra.Command {
	var opts api.DiffOptions
	cmd := &cobra.Command{
		Use:   "import-diff FILE IMAGE",
		Short: "Apply a diff written by export-diff (FILE, or - for stdin) to IMAGE",
		Long: "Apply a diff written by 'ukai image export-diff' (or rbd export-diff) to IMAGE, through its owner, to every\n" +
			"copy. As rbd does, a diff from snapshot S1 applies only to an image that has a snapshot S1 (the image a\n" +
			"previous import-diff brought there has it; --force applies it anyway), and the image gets the snapshot\n" +
			"the diff ends at, on which the next diff applies (--no-snapshot: not). An image smaller than the\n" +
			"diff's size grows first.",
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			var r io.Reader = os.Stdin
			var pr *progress
			if args[0] != "-" {
				f, err := os.Open(args[0])
				if err != nil {
					return err
				}
				defer f.Close()
				r = f
				if st, err := f.Stat(); err == nil && st.Mode().IsRegular() {
					pr = newProgress(cmd.ErrOrStderr(), "import-diff "+args[1], "bytes", st.Size())
					r = countingReader{r: r, p: pr}
				}
			}
			out, err := a.client().WriteDiff(cmd.Context(), args[1], r, opts)
			if pr != nil {
				pr.finish()
			}
			if err != nil {
				return fmt.Errorf("import-diff into %s: %w", args[1], err)
			}
			if asked, err := printIfAsked(cmd, a.out, out); asked {
				return err
			}
			what := "the data of " + out.To
			if out.From != "" {
				what = "the changes from " + out.From + " to " + out.To
			}
			fmt.Fprintf(a.out, "applied %s to %s: %s written, %s zeroed\n", what, args[1], FormatSize(out.Written), FormatSize(out.Zeroed))
			if out.Snapshot != "" {
				fmt.Fprintf(a.out, "took snapshot %s\n", out.Snapshot)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&opts.Force, "force", false, "apply a diff whose starting snapshot the image does not have")
	cmd.Flags().BoolVar(&opts.NoSnapshot, "no-snapshot", false, "take no snapshot of the diff's end")
	cmd.Flags().StringP("output", "o", "table", "output format: table, json or yaml (what was applied)")
	return cmd
}
