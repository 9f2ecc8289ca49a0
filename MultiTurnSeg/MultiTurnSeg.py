"""MultiTurnSeg: chat with the MediRound segmentation model, slice by slice.

A thin Slicer layer over MultiTurnSegLib (the pip-installable library, shipped
beside this file). This file holds only what needs Slicer: the panel, reading
the slice shown in a view, writing masks into segments, the scene storage and
the self-test. Everything else (rendering slices, references, running turns,
backends, serialization) is the library's; the Slicer-free helpers of this
module are in MultiTurnSegSupport/.

MultiTurnSegLib is imported inside functions: torch, transformers, pynrrd...
may not be installed yet when Slicer loads this module ("Install dependencies"
in the panel installs them).

Types of Slicer objects are annotated (``x: "vtkMRMLSliceNode" = ...``) where
the CI check (Testing/Python/test_slicer_module_api.py) cannot infer them, so
every MRML/VTK call is checked against Slicer's API index.
"""

import logging
import os
import sys
import tempfile

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def _ensureImportPaths():
    """Make MultiTurnSegLib and MultiTurnSegSupport importable.

    Installed extension: both sit beside this file. Source checkout added with
    "Additional module paths" = <repository>/MultiTurnSeg: the library is one
    folder up.
    """
    for directory in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
        if os.path.isfile(os.path.join(directory, "MultiTurnSegLib", "__init__.py")) or os.path.isfile(
            os.path.join(directory, "MultiTurnSegSupport", "__init__.py")
        ):
            if directory not in sys.path:
                sys.path.insert(0, directory)


_ensureImportPaths()

import MultiTurnSegSupport as support  # noqa: E402  (stdlib only; imports the library lazily)


def _resourcePath(relativePath):
    """Path of Resources/<relativePath>: beside this file once installed, one folder up in a source checkout."""
    for directory in (_MODULE_DIR, os.path.dirname(_MODULE_DIR)):
        candidate = os.path.join(directory, "Resources", relativePath)
        if os.path.exists(candidate):
            return candidate
    return os.path.join(_MODULE_DIR, "Resources", relativePath)


SLICE_VIEW_NAMES = ("Red", "Yellow", "Green")
MODULE_NAME = "MultiTurnSeg"


#
# MultiTurnSeg
#


class MultiTurnSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MultiTurnSeg")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["MultiTurnSeg developers"]
        self.parent.helpText = _(
            "Chat with the MediRound model about the slice shown in a view. Each answer becomes a new segment "
            "(named R1, R2, ... after your request); later requests can refer to earlier results "
            "('the previous output', 'round 2', a segment name), also after you edited them in the Segment Editor. "
            "The model runs on this computer or on a remote MultiTurnSeg worker. "
            'See <a href="https://github.com/multiturnseg/SlicerMultiTurnSeg#slicer">the documentation</a>.'
        )
        self.parent.acknowledgementText = _(
            "MultiTurnSeg runs MediRound (multi-round referring medical segmentation). "
            "Built on 3D Slicer's scripted module template."
        )
        iconPath = _resourcePath("Icons/MultiTurnSeg.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)


#
# MultiTurnSegWidget
#


class MultiTurnSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self.task = None
        self.pollTimer = None
        self._updatingGUI = False
        self._propagationRangeKey = None  # (conversation id, axis, slice, slice count) the spin boxes were set up for
        self._observedSliceNode = None  # slice node of the chosen view, observed to follow the slice shown

    # -- setup ---------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(_resourcePath("UI/MultiTurnSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MultiTurnSegLogic()

        self.ui.chatHistoryTable.setColumnCount(5)
        self.ui.chatHistoryTable.setHorizontalHeaderLabels(["", _("Round"), _("Prompt"), _("Answer"), _("JCM")])
        self.ui.chatHistoryTable.verticalHeader().setVisible(False)
        self.ui.chatHistoryTable.horizontalHeader().setStretchLastSection(False)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        self._fillWindowPresets()
        self._fillReferenceChoices()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(100)
        self.pollTimer.connect("timeout()", self.onPollTask)

        # Connections
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.sliceViewSelector.connect("currentIndexChanged(int)", self.onSliceViewChanged)
        self.ui.windowPresetSelector.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.promptLineEdit.connect("returnPressed()", self.onSend)
        self.ui.sendButton.connect("clicked(bool)", self.onSend)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.newConversationButton.connect("clicked(bool)", self.onNewConversation)
        self.ui.goToSliceButton.connect("clicked(bool)", self.onGoToSlice)
        self.ui.conversationSliceSelector.connect("activated(int)", self.onGoToSlice)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.propagateFirstSliceSpinBox.connect("valueChanged(int)", self.onPropagateFirstChanged)
        self.ui.propagateLastSliceSpinBox.connect("valueChanged(int)", self.onPropagateLastChanged)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.localBackendRadioButton.connect("toggled(bool)", self.onBackendKindChanged)
        self.ui.remoteBackendRadioButton.connect("toggled(bool)", self.onBackendKindChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onSettingsChanged)
        self.ui.deviceSelector.connect("currentTextChanged(QString)", self.onSettingsChanged)
        self.ui.workerUrlLineEdit.connect("editingFinished()", self.onSettingsChanged)
        self.ui.workerTokenLineEdit.connect("editingFinished()", self.onSettingsChanged)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

        self._loadSettings()
        self.initializeFromScene()

    def cleanup(self):
        self.removeObservers()
        if self.pollTimer:
            self.pollTimer.stop()
        if self.task and not self.task.done:
            self.task.cancel()
            self.task.wait(5.0)
        # Closing a backend a running thread still uses could crash it; one still busy is left to finish.
        if self.logic and (self.task is None or self.task.done):
            self.logic.closeBackend()

    def enter(self):
        self.initializeFromScene()

    def onSceneStartClose(self, caller, event):
        if self.task and not self.task.done:
            self.task.cancel()
        self.logic.forgetConversation()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeFromScene()

    def onSceneEndImport(self, caller, event):
        # A loaded scene brings its parameter node: restore inputs and chat.
        self.initializeFromScene()

    # -- GUI <-> parameter node ------------------------------------------------
    def _fillWindowPresets(self):
        combo = self.ui.windowPresetSelector
        previous = combo.currentText
        try:
            from MultiTurnSegLib import imaging

            names = list(imaging.window_names())
        except ImportError:
            names = ["auto"]
        wasBlocked = combo.blockSignals(True)  # refilled after installing dependencies: keep the user's choice
        try:
            combo.clear()
            for name in names:
                combo.addItem(name)
            combo.setCurrentIndex(max(0, combo.findText(previous)) if previous else 0)
        finally:
            combo.blockSignals(wasBlocked)

    def _fillReferenceChoices(self):
        combo = self.ui.referenceSelector
        previous = combo.currentData
        combo.clear()
        combo.addItem(_("Automatic (from the prompt)"), support.REFERENCE_AUTO)
        combo.addItem(_("None"), support.REFERENCE_NONE)
        segmentationNode = self.ui.segmentationSelector.currentNode()
        if segmentationNode:
            for segmentId, name in self.logic.segmentNamesAndIds(segmentationNode):
                combo.addItem(_("Segment: {name}").format(name=name), "segment:" + segmentId)
        index = combo.findData(previous) if previous else 0
        combo.setCurrentIndex(max(0, index))

    def _loadSettings(self):
        """Backend settings of this computer (never the token)."""
        settings = qt.QSettings()
        kind = settings.value("MultiTurnSeg/BackendKind", support.BACKEND_LOCAL)
        self.ui.remoteBackendRadioButton.setChecked(kind == support.BACKEND_REMOTE)
        self.ui.localBackendRadioButton.setChecked(kind != support.BACKEND_REMOTE)
        self.ui.modelPathLineEdit.setCurrentPath(settings.value("MultiTurnSeg/ModelPath", ""))
        self.ui.deviceSelector.setCurrentText(settings.value("MultiTurnSeg/Device", "auto"))
        self.ui.workerUrlLineEdit.setText(settings.value("MultiTurnSeg/WorkerUrl", ""))
        self._updateBackendFrames()

    def _saveSettings(self):
        settings = qt.QSettings()
        settings.setValue("MultiTurnSeg/BackendKind", self.backendKind())
        settings.setValue("MultiTurnSeg/ModelPath", self.ui.modelPathLineEdit.currentPath)
        settings.setValue("MultiTurnSeg/Device", self.ui.deviceSelector.currentText)
        settings.setValue("MultiTurnSeg/WorkerUrl", self.ui.workerUrlLineEdit.text)

    def backendKind(self):
        return support.BACKEND_REMOTE if self.ui.remoteBackendRadioButton.checked else support.BACKEND_LOCAL

    def backendConfig(self):
        return {
            "kind": self.backendKind(),
            "model_path": self.ui.modelPathLineEdit.currentPath.strip(),
            "device": self.ui.deviceSelector.currentText.strip() or "auto",
            "url": self.ui.workerUrlLineEdit.text.strip(),
            "token": self.ui.workerTokenLineEdit.text.strip(),
        }

    def initializeFromScene(self):
        """Select the inputs stored in the parameter node (or sensible defaults) and show its conversation."""
        if not self.ui:
            return
        self._updatingGUI = True
        try:
            parameterNode: "vtkMRMLScriptedModuleNode" = self.logic.getParameterNode()
            volumeNode = parameterNode.GetNodeReference(support.REFERENCE_INPUT_VOLUME)
            if not volumeNode:
                volumeNode = self.ui.inputVolumeSelector.currentNode() or slicer.mrmlScene.GetFirstNodeByClass(
                    "vtkMRMLScalarVolumeNode"
                )
            segmentationNode = parameterNode.GetNodeReference(support.REFERENCE_SEGMENTATION)
            if not segmentationNode:
                segmentationNode = self.ui.segmentationSelector.currentNode()
            self.ui.inputVolumeSelector.setCurrentNode(volumeNode)
            self.ui.segmentationSelector.setCurrentNode(segmentationNode)
            view = parameterNode.GetParameter("SliceView")
            if view in SLICE_VIEW_NAMES:
                self.ui.sliceViewSelector.setCurrentIndex(SLICE_VIEW_NAMES.index(view))
            window = parameterNode.GetParameter("WindowPreset")
            if window:
                index = self.ui.windowPresetSelector.findText(window)
                if index >= 0:
                    self.ui.windowPresetSelector.setCurrentIndex(index)
        finally:
            self._updatingGUI = False
        self.logic.loadConversations()
        self._storeInputs()
        self._observeSliceView()
        self.logic.updateShownSlice()
        self.updateChat()

    def _observeSliceView(self):
        """Observe the chosen view's slice node: the chat follows the slice it shows."""
        # vtkCommand.ModifiedEvent is generated by a macro the API index cannot list: look the id up by name.
        modifiedEvent = vtk.vtkCommand.GetEventIdFromString("ModifiedEvent")
        sliceNode: "vtkMRMLSliceNode" = None
        try:
            sliceNode = self.logic._sliceNode(self.ui.sliceViewSelector.currentText)
        except ValueError:  # no such view in the layout (or no main window)
            sliceNode = None
        if sliceNode is self._observedSliceNode:
            return
        if self._observedSliceNode is not None:
            self.removeObserver(self._observedSliceNode, modifiedEvent, self.onShownSliceModified)
        self._observedSliceNode = sliceNode
        if sliceNode is not None:
            self.addObserver(sliceNode, modifiedEvent, self.onShownSliceModified)

    def onShownSliceModified(self, caller=None, event=None):
        # Called on every change of the slice node (pan, zoom, ...): the chat is redrawn only when
        # the slice shown (volume, axis, index) changed.
        if self.logic.updateShownSlice():
            self.updateChat()

    def onSliceViewChanged(self, index=None):
        if self._updatingGUI:
            return
        self._storeInputs()
        self._observeSliceView()
        self.onShownSliceModified()
        self.updateButtons()

    def _storeInputs(self):
        self.logic.setInputs(
            self.ui.inputVolumeSelector.currentNode(),
            self.ui.segmentationSelector.currentNode(),
            self.ui.sliceViewSelector.currentText,
            self.ui.windowPresetSelector.currentText,
        )

    def onInputsChanged(self, node=None):
        if self._updatingGUI:
            return
        self._storeInputs()
        self._fillReferenceChoices()
        self.logic.updateShownSlice()
        self.updateChat()

    def onSettingsChanged(self, *args):
        if self._updatingGUI:
            return
        self._storeInputs()
        self._saveSettings()
        self.updateButtons()

    def onBackendKindChanged(self, checked=True):
        self._updateBackendFrames()
        self.onSettingsChanged()

    def _updateBackendFrames(self):
        remote = self.ui.remoteBackendRadioButton.checked
        self.ui.localBackendFrame.setVisible(not remote)
        self.ui.remoteBackendFrame.setVisible(remote)
        self._updateDependencyStatus()

    def _updateDependencyStatus(self):
        missing = support.missing_requirements(self.backendKind())
        if missing:
            self.ui.dependenciesStatusLabel.setText(
                _("Missing Python packages: {packages}").format(packages=", ".join(missing.describe()))
            )
        else:
            self.ui.dependenciesStatusLabel.setText(_("All Python packages for this backend are installed."))
        self.ui.installDependenciesButton.setEnabled(bool(missing))

    # -- chat display ----------------------------------------------------------
    def updateChat(self):
        table = self.ui.chatHistoryTable
        conversation = self.logic.conversation
        turns = conversation.turns if conversation is not None else []
        table.setRowCount(len(turns))
        for row, turn in enumerate(turns):
            swatch = qt.QTableWidgetItem("")
            swatch.setBackground(qt.QBrush(qt.QColor(support.color_hex(turn.color))))
            swatch.setToolTip(turn.segment_name)
            table.setItem(row, 0, swatch)
            roundItem = qt.QTableWidgetItem(f"R{turn.round}")
            roundItem.setToolTip(
                _("Segment {name}; refers to {reference}").format(
                    name=turn.segment_name, reference=support.reference_text(turn.reference)
                )
            )
            table.setItem(row, 1, roundItem)
            promptItem = qt.QTableWidgetItem(turn.prompt)
            promptItem.setToolTip(turn.prompt)
            table.setItem(row, 2, promptItem)
            answerItem = qt.QTableWidgetItem(turn.answer)
            answerItem.setToolTip(turn.answer)
            table.setItem(row, 3, answerItem)
            text, low, tip = support.jcm_text(turn.jcm_score, turn.jcm_refined)
            jcmItem = qt.QTableWidgetItem(text)
            jcmItem.setToolTip(tip)
            if low:
                jcmItem.setForeground(qt.QBrush(qt.QColor("#d03030")))
            table.setItem(row, 4, jcmItem)
        table.resizeColumnsToContents()
        if turns:
            table.scrollToBottom()
        shown = self.logic.shownSlice
        if conversation is not None:
            info = _("Conversation on {axis} slice {index} ({count} rounds).").format(
                axis=conversation.axis, index=conversation.slice_index, count=len(turns)
            )
            record = self.logic.propagationRecord()
            if record is not None:
                info += " " + _("Rounds 1-{rounds} propagated to {axis} slices {first}..{last}.").format(
                    rounds=record["rounds"], axis=record["axis"], first=record["first"], last=record["last"]
                )
                if record["flagged"]:
                    info += " " + _("JCM corrected: {flagged}.").format(flagged=support.flagged_text(record["flagged"]))
        elif shown is not None:
            info = _("No conversation on {axis} slice {index} yet: type a request to start one.").format(
                axis=shown[1], index=shown[2]
            )
        elif self.logic.shownSliceError:
            info = self.logic.shownSliceError
        else:
            info = _("No conversation yet: type a request to start one on the slice shown.")
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        others = [
            c for c in (self.logic.conversationsOfVolume(volumeNode.GetID()) if volumeNode else []) if c is not conversation
        ]
        if others:
            info += " " + _("{count} other slice(s) have conversations: {slices}.").format(
                count=len(others), slices=support.conversation_slices_text(others)
            )
        self.ui.conversationInfoLabel.setText(info)
        self._fillConversationSlices()
        self._fillReferenceChoices()
        self._updatePropagationRange()
        self.updateButtons()

    def _fillConversationSlices(self):
        """The slices with a conversation (of the input volume), to jump to; the current one selected."""
        combo = self.ui.conversationSliceSelector
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        conversations = self.logic.conversationsOfVolume(volumeNode.GetID()) if volumeNode else []
        current = self.logic.conversation
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            for conversation in conversations:
                combo.addItem(
                    _("{axis} slice {index} ({count} rounds)").format(
                        axis=conversation.axis, index=conversation.slice_index, count=len(conversation.turns)
                    ),
                    conversation.id,
                )
            combo.setCurrentIndex(max(0, combo.findData(current.id)) if current is not None else -1)
        finally:
            combo.blockSignals(wasBlocked)

    def _updatePropagationRange(self):
        """Spin box ranges from the volume's slice count on the conversation's axis; values set when the conversation changes."""
        conversation = self.logic.conversation
        count = 0
        if conversation is not None and conversation.turns:
            try:
                count = self.logic.propagationSliceCount()
            except Exception:  # no volume, volume under a transform, library not installed...
                count = 0
        key = (conversation.id, conversation.axis, conversation.slice_index, count) if count else None
        if key == self._propagationRangeKey:
            return
        self._propagationRangeKey = key
        first, last = self.ui.propagateFirstSliceSpinBox, self.ui.propagateLastSliceSpinBox
        wasBlocked = (first.blockSignals(True), last.blockSignals(True))
        try:
            if not count:
                first.setRange(0, 0)
                last.setRange(0, 0)
                return
            first.setRange(0, count - 1)
            last.setRange(0, count - 1)
            record = self.logic.propagationRecord()
            if record is not None and record["last"] < count:
                start, stop = record["first"], record["last"]
            else:
                start, stop = support.default_propagation_range(conversation.slice_index, count)
            first.setValue(start)
            last.setValue(stop)
        finally:
            first.blockSignals(wasBlocked[0])
            last.blockSignals(wasBlocked[1])

    def onPropagateFirstChanged(self, value):
        if self.ui.propagateLastSliceSpinBox.value < value:
            self.ui.propagateLastSliceSpinBox.setValue(value)

    def onPropagateLastChanged(self, value):
        if self.ui.propagateFirstSliceSpinBox.value > value:
            self.ui.propagateFirstSliceSpinBox.setValue(value)

    def updateButtons(self):
        running = bool(self.task and not self.task.done)
        haveInputs = bool(self.ui.inputVolumeSelector.currentNode())
        haveTurns = bool(self.logic.conversation is not None and self.logic.conversation.turns)
        self.ui.sendButton.setEnabled(haveInputs and not running)
        self.ui.promptLineEdit.setEnabled(not running)
        self.ui.undoButton.setEnabled(haveTurns and not running)
        self.ui.newConversationButton.setEnabled(self.logic.conversation is not None and not running)
        self.ui.goToSliceButton.setEnabled(self.ui.conversationSliceSelector.count > 0)
        self.ui.conversationSliceSelector.setEnabled(self.ui.conversationSliceSelector.count > 0)
        self.ui.exportButton.setEnabled(bool(self.ui.segmentationSelector.currentNode()) and not running)
        self.ui.testConnectionButton.setEnabled(not running)
        canPropagate = haveTurns and haveInputs and not running and self._propagationRangeKey is not None
        self.ui.propagateButton.setEnabled(canPropagate)
        self.ui.propagateFirstSliceSpinBox.setEnabled(canPropagate)
        self.ui.propagateLastSliceSpinBox.setEnabled(canPropagate)
        self.ui.progressBar.setVisible(running)
        self.ui.cancelButton.setVisible(running)

    def showStatus(self, message, error=False):
        self.ui.statusLabel.setText(message)
        self.ui.statusLabel.setStyleSheet("color: #d03030;" if error else "")
        if error:
            logging.warning("MultiTurnSeg: %s", message)

    # -- turns -----------------------------------------------------------------
    def onSend(self):
        if self.task and not self.task.done:
            return
        prompt = self.ui.promptLineEdit.text.strip()
        if not prompt:
            self.showStatus(_("Type what to segment, e.g. 'Segment the liver'."), error=True)
            return
        self._storeInputs()
        try:
            self.task = self.logic.startTurn(
                prompt, self.ui.referenceSelector.currentData, self.backendConfig()
            )
        except Exception as exc:
            self.showStatus(support.error_message(exc), error=True)
            return
        self.showStatus(_("Running the turn..."))
        self.ui.progressBar.setValue(0)
        self.pollTimer.start()
        self.updateButtons()

    def onPropagate(self):
        if self.task and not self.task.done:
            return
        self._storeInputs()
        first = self.ui.propagateFirstSliceSpinBox.value
        last = self.ui.propagateLastSliceSpinBox.value
        try:
            self.task = self.logic.startPropagation(first, last, self.backendConfig())
        except Exception as exc:
            self.showStatus(support.error_message(exc), error=True)
            return
        self.showStatus(
            _("Propagating the conversation to {axis} slices {first}..{last} (each slice is an independent 2D prediction)...").format(
                axis=self.logic.conversation.axis, first=first, last=last
            )
        )
        self.ui.progressBar.setValue(0)
        self.pollTimer.start()
        self.updateButtons()

    def onCancel(self):
        if self.task and not self.task.done:
            self.task.cancel()
            if self.task.kind == "propagation":
                self.showStatus(_("Cancelling the propagation: the segments and the conversation stay as they are."))
            else:
                self.showStatus(_("Cancelling: the result of this turn will be discarded."))

    def onPollTask(self):
        task = self.task
        if task is None:
            self.pollTimer.stop()
            return
        stage, fraction, elapsed = task.poll()
        self.ui.progressBar.setValue(int(round(fraction * 100)))
        self.ui.progressBar.setFormat(f"{stage} ({elapsed:.0f} s)")
        if not task.done:
            return
        self.pollTimer.stop()
        try:
            message = self.logic.finishTask(task)
            self.showStatus(message or "")
            if task.kind == "turn" and not task.cancelled and task.error is None:
                self.ui.promptLineEdit.setText("")
        except Exception as exc:
            self.showStatus(support.error_message(exc), error=True)
        if task.kind == "test-connection":
            ok = task.error is None and not task.cancelled
            self.ui.workerInfoLabel.setText(_("Connected. ") + support.worker_info_text(task.result[2]) if ok else "")
        self.logic.updateShownSlice()  # the view may have moved while the task ran
        self.updateChat()

    def onUndo(self):
        try:
            turn = self.logic.undoLastTurn()
            self.showStatus(_("Removed round {round} ({name}).").format(round=turn.round, name=turn.segment_name))
        except Exception as exc:
            self.showStatus(support.error_message(exc), error=True)
        self.updateChat()

    def onNewConversation(self):
        self.logic.newConversation()
        self.showStatus(
            _("New conversation: the next request starts it on this slice. Its segments and other slices' conversations are kept.")
        )
        self.updateChat()

    def onGoToSlice(self, *args):
        """Move the view to the slice of the conversation chosen in the list (its chat then shows)."""
        conversation = self.logic.conversationById(self.ui.conversationSliceSelector.currentData)
        try:
            self.logic.showConversationSlice(conversation)
        except Exception as exc:
            self.showStatus(support.error_message(exc), error=True)
        self.onShownSliceModified()

    # -- export ------------------------------------------------------------------
    def onExport(self):
        segmentationNode = self.ui.segmentationSelector.currentNode()
        dicom = self.ui.exportFormatSelector.currentIndex == 1
        if dicom:
            directory = qt.QFileDialog.getExistingDirectory(None, _("Export DICOM-SEG into folder"))
            if not directory:
                return
            target = directory
        else:
            target = qt.QFileDialog.getSaveFileName(
                None, _("Export segmentation"), (segmentationNode.GetName() if segmentationNode else "segmentation") + ".seg.nrrd",
                "Segmentation (*.seg.nrrd)",
            )
            if not target:
                return
        try:
            path = self.logic.exportSegmentation(target, dicom=dicom)
            self.showStatus(_("Exported to {path}").format(path=path))
        except Exception as exc:
            self.showStatus(support.error_message(exc), error=True)

    # -- backend -----------------------------------------------------------------
    def onTestConnection(self):
        if self.task and not self.task.done:
            return
        self.ui.workerInfoLabel.setText(_("Connecting..."))
        try:
            self.task = self.logic.startTestConnection(self.backendConfig())
        except Exception as exc:
            self.ui.workerInfoLabel.setText("")
            self.showStatus(support.error_message(exc), error=True)
            return
        self.pollTimer.start()
        self.updateButtons()

    def onInstallDependencies(self):
        kind = self.backendKind()
        dicom = self.ui.exportFormatSelector.currentIndex == 1
        missing = support.missing_requirements(kind, dicom=dicom)
        if not missing:
            self.showStatus(_("All Python packages for this backend are installed."))
            return
        text = _("MultiTurnSeg will install these Python packages into Slicer:") + "\n\n"
        text += "\n".join("  - " + item for item in missing.describe())
        text += "\n\n" + _("This downloads several hundred MB to a few GB and can take minutes. Continue?")
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("Install MultiTurnSeg dependencies")):
            return
        try:
            self.logic.installDependencies(missing)
            self.showStatus(_("Dependencies installed."))
        except Exception as exc:
            self.showStatus(_("Installing dependencies failed: {error}").format(error=exc), error=True)
        self._updateDependencyStatus()
        self._fillWindowPresets()
        self.onSettingsChanged()


#
# MultiTurnSegLogic
#


class MultiTurnSegLogic(ScriptedLoadableModuleLogic):
    """What needs Slicer: views, volume and segmentation nodes, the parameter node.

    Turns run in a background thread (support.BackgroundTask); the GUI (or the
    self-test) polls ``task.done`` and then calls :meth:`finishTask` in the
    main thread, which writes the result into the scene.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.conversations = []  # every conversation of the scene (MultiTurnSegLib Conversations, one per slice)
        self.shownSlice = None  # (volume node ID, axis, index) the chosen view showed when last resolved
        self.shownSliceError = ""  # why no slice could be resolved (oblique view, no layout, ...)
        self._backend = None
        self._backendKey = None
        self._pendingTurn = None
        self._pendingPropagation = None
        self.lastPropagation = None  # PropagationResult last written into the segments (scripts, self-test)

    # -- parameter node ----------------------------------------------------------
    def setInputs(self, volumeNode: "vtkMRMLScalarVolumeNode", segmentationNode: "vtkMRMLSegmentationNode", sliceViewName, windowPreset):
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        parameterNode.SetNodeReferenceID(support.REFERENCE_INPUT_VOLUME, volumeNode.GetID() if volumeNode else None)
        parameterNode.SetNodeReferenceID(
            support.REFERENCE_SEGMENTATION, segmentationNode.GetID() if segmentationNode else None
        )
        parameterNode.SetParameter("SliceView", sliceViewName or "Red")
        parameterNode.SetParameter("WindowPreset", windowPreset or "auto")

    def inputVolume(self) -> "vtkMRMLScalarVolumeNode":
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        return parameterNode.GetNodeReference(support.REFERENCE_INPUT_VOLUME)

    def segmentationNode(self, create=False) -> "vtkMRMLSegmentationNode":
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        segmentationNode: "vtkMRMLSegmentationNode" = parameterNode.GetNodeReference(support.REFERENCE_SEGMENTATION)
        if segmentationNode is None and create:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "MultiTurnSeg")
            segmentationNode.CreateDefaultDisplayNodes()
            parameterNode.SetNodeReferenceID(support.REFERENCE_SEGMENTATION, segmentationNode.GetID())
        return segmentationNode

    # -- conversations (one per slice) ------------------------------------------------
    @staticmethod
    def _slicekey(conversation):
        return (conversation.volume, conversation.axis, int(conversation.slice_index))

    @property
    def conversation(self):
        """The conversation on the slice shown in the chosen view (None when there is none yet)."""
        return self.conversationOn(self.shownSlice) if self.shownSlice is not None else None

    @conversation.setter
    def conversation(self, conversation):
        """Scripts: make ``conversation`` the one of its slice (replacing any there) and the current one."""
        if conversation is None:
            self.newConversation()
            return
        key = self._slicekey(conversation)
        self.conversations = [
            c for c in self.conversations if c.id != conversation.id and self._slicekey(c) != key
        ] + [conversation]
        self.shownSlice, self.shownSliceError = key, ""

    def conversationOn(self, key):
        """The conversation on ``key`` = (volume node ID, axis, slice index), or None."""
        key = tuple(key)
        return next((c for c in self.conversations if self._slicekey(c) == key), None)

    def conversationById(self, conversationId):
        return next((c for c in self.conversations if c.id == conversationId), None)

    def conversationsOfVolume(self, volumeNodeId):
        """The conversations about the volume node, ordered by axis and slice."""
        found = [c for c in self.conversations if c.volume == volumeNodeId]
        return sorted(found, key=lambda c: (c.axis, c.slice_index))

    def _removeConversation(self, conversation):
        self.conversations = [c for c in self.conversations if c is not conversation]

    def loadConversations(self):
        """The conversations stored in the parameter node (unreadable ones are left out and logged).

        Re-entering the module reloads them: an object equal to the stored one is kept, so a running
        turn or propagation still finds the conversation it was started on.
        """
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        loaded, problems = support.conversations_from_json_text(
            parameterNode.GetParameter(support.PARAMETER_CONVERSATIONS),
            parameterNode.GetParameter(support.PARAMETER_CONVERSATION),
        )
        for problem in problems:
            logging.error("MultiTurnSeg: %s; it is left out.", problem)
        inMemory = {c.id: c for c in self.conversations}
        kept = []
        for conversation in loaded:
            previous = inMemory.get(conversation.id)
            kept.append(previous if previous is not None and previous == conversation else conversation)
        self.conversations = kept
        return self.conversations

    def loadConversation(self):
        """Load all stored conversations; return the current one (on the shown slice) or None."""
        self.loadConversations()
        return self.conversation

    def saveConversations(self):
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        text = support.conversations_to_json_text(self.conversations) if self.conversations else ""
        parameterNode.SetParameter(support.PARAMETER_CONVERSATIONS, text)
        if parameterNode.GetParameter(support.PARAMETER_CONVERSATION):
            parameterNode.SetParameter(support.PARAMETER_CONVERSATION, "")  # an older scene's: now in the list

    saveConversation = saveConversations

    def forgetConversation(self):
        self.conversations = []
        self.shownSlice, self.shownSliceError = None, ""
        self._pendingTurn = None
        self._pendingPropagation = None

    def newConversation(self):
        """Drop the current slice's conversation (its segments stay); the next request there starts a new one."""
        conversation = self.conversation
        if conversation is None:
            return
        self._removeConversation(conversation)
        self._setPropagationRecord(conversation.id, "")
        self.saveConversations()

    def updateShownSlice(self):
        """Re-read which slice of the input volume the chosen view shows; True when that changed."""
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        volumeNode: "vtkMRMLScalarVolumeNode" = self.inputVolume()
        key, error = None, ""
        if volumeNode is not None:
            try:
                volume = self.volumeFromNode(volumeNode)
                axis, index = self.sliceShownInView(volume, parameterNode.GetParameter("SliceView") or "Red")
                key = (volumeNode.GetID(), axis, int(index))
            except Exception as exc:  # oblique view, slice outside the volume, no layout, library missing...
                error = support.error_message(exc) if not isinstance(exc, (ValueError, ImportError)) else str(exc)
        changed = (key, error) != (self.shownSlice, self.shownSliceError)
        self.shownSlice, self.shownSliceError = key, error
        return changed

    # -- volume and slice ----------------------------------------------------------
    def volumeFromNode(self, volumeNode: "vtkMRMLScalarVolumeNode"):
        """The library Volume of a scalar volume node (array not copied: use it in the main thread)."""
        import numpy as np

        from MultiTurnSegLib import imaging

        if volumeNode is None:
            raise ValueError(_("Select an input volume."))
        if volumeNode.GetParentTransformNode() is not None:
            raise ValueError(
                _("The volume {name} is under a transform: harden the transform (Data module) first.").format(
                    name=volumeNode.GetName()
                )
            )
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        matrix = np.array([[ijkToRas.GetElement(r, c) for c in range(4)] for r in range(4)])
        ijkToLps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
        return imaging.volume_from_array(slicer.util.arrayFromVolume(volumeNode), ijkToLps, source=volumeNode.GetName())

    @staticmethod
    def _sliceNode(sliceViewName) -> "vtkMRMLSliceNode":
        """The slice node of the named view; ValueError when the layout has no such view."""
        layoutManager: "qSlicerLayoutManager" = slicer.app.layoutManager()
        if layoutManager is None:
            raise ValueError(_("No slice views are available (Slicer runs without its main window)."))
        sliceWidget: "qMRMLSliceWidget" = layoutManager.sliceWidget(sliceViewName)
        if sliceWidget is None:
            raise ValueError(
                _("The {view} slice view is not in the current layout; choose another view or layout.").format(
                    view=sliceViewName
                )
            )
        return sliceWidget.mrmlSliceNode()

    def sliceShownInView(self, volume, sliceViewName):
        """(axis, index) of the slice of ``volume`` shown in the named slice view."""
        from MultiTurnSegLib import imaging

        sliceNode: "vtkMRMLSliceNode" = self._sliceNode(sliceViewName)
        sliceToRas: "vtkMatrix4x4" = sliceNode.GetSliceToRAS()
        normalRas = [sliceToRas.GetElement(row, 2) for row in range(3)]
        centerRas = [sliceToRas.GetElement(row, 3) for row in range(3)]
        try:
            axis = support.axis_for_view(volume, normalRas, view_name=_("The {view} view").format(view=sliceViewName))
        except support.ObliqueViewError as exc:
            raise ValueError(str(exc)) from None
        index = imaging.slice_index_at(volume, axis, support.ras_to_lps(centerRas))
        return axis, index

    def showSlice(self, axis, index):
        """Move the chosen slice view to slice ``index`` of the input volume along ``axis``."""
        from MultiTurnSegLib import imaging

        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        volumeNode: "vtkMRMLScalarVolumeNode" = self.inputVolume()
        volume = self.volumeFromNode(volumeNode)
        centerLps = imaging.slice_center_lps(volume, axis, index)
        sliceNode: "vtkMRMLSliceNode" = self._sliceNode(parameterNode.GetParameter("SliceView") or "Red")
        ras = support.ras_to_lps(centerLps)  # the same sign flip maps LPS back to RAS
        sliceNode.JumpSliceByCentering(ras[0], ras[1], ras[2])
        self.updateShownSlice()

    def showConversationSlice(self, conversation=None):
        """Move the chosen slice view to the slice of ``conversation`` (default: the current one)."""
        conversation = conversation if conversation is not None else self.conversation
        if conversation is None:
            return
        volumeNode: "vtkMRMLScalarVolumeNode" = self.inputVolume()
        if volumeNode is None or conversation.volume != volumeNode.GetID():
            raise ValueError(
                _("This conversation is about another volume ({volume}); select it as the input volume.").format(
                    volume=conversation.volume
                )
            )
        self.showSlice(conversation.axis, conversation.slice_index)

    # -- segments ------------------------------------------------------------------
    def segmentNamesAndIds(self, segmentationNode: "vtkMRMLSegmentationNode"):
        segmentation: "vtkSegmentation" = segmentationNode.GetSegmentation()
        result = []
        for i in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(i)
            segment: "vtkSegment" = segmentation.GetSegment(segmentId)
            result.append((segmentId, segment.GetName()))
        return result

    def segmentMaskOnSlice(self, segmentationNode: "vtkMRMLSegmentationNode", segmentId, volumeNode, volume, axis, index):
        """The segment's CURRENT content on the slice, as an (H, W) bool mask (hand edits included)."""
        from MultiTurnSegLib import imaging

        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        return imaging.extract_mask(labelmap, volume, axis, index)

    def turnSegmentId(self, segmentationNode: "vtkMRMLSegmentationNode", turn, conversation=None):
        """ID of the segment of ``turn`` of ``conversation`` (default: the current one), or None if it was deleted."""
        from MultiTurnSegLib.conversation.segments import segment_id_for

        segmentId = segment_id_for(conversation if conversation is not None else self.conversation, turn)
        segmentation: "vtkSegmentation" = segmentationNode.GetSegmentation()
        return segmentId if segmentation.GetSegment(segmentId) is not None else None

    def _writeTurnSegment(self, segmentationNode: "vtkMRMLSegmentationNode", volumeNode, volume, conversation, turn):
        """Add the turn's mask as a NEW segment (other segments untouched); return its ID."""
        import numpy as np

        from MultiTurnSegLib import imaging
        from MultiTurnSegLib.conversation.segments import segment_id_for, segment_tags
        from MultiTurnSegLib.export.terminology import terminology_entry_for

        segmentation: "vtkSegmentation" = segmentationNode.GetSegmentation()
        segmentId = segment_id_for(conversation, turn)
        if segmentation.GetSegment(segmentId) is not None:
            segmentation.RemoveSegment(segmentId)  # a stale segment of an undone round
        labelmap = np.zeros(volume.shape, dtype=np.uint8)
        imaging.insert_mask(labelmap, volume, conversation.axis, conversation.slice_index, turn.mask, 1)
        tags = segment_tags(conversation, turn)
        terminologyEntry = terminology_entry_for(turn.prompt)
        segmentId = segmentation.AddEmptySegment(segmentId, turn.segment_name, list(turn.color))
        try:
            slicer.util.updateSegmentBinaryLabelmapFromArray(labelmap, segmentationNode, segmentId, volumeNode)
            segment: "vtkSegment" = segmentation.GetSegment(segmentId)
            segment.SetName(turn.segment_name)
            segment.SetColor(*[float(c) for c in turn.color])
            for name, value in tags.items():
                segment.SetTag(name, value)
            if terminologyEntry:
                segment.SetTerminology(terminologyEntry)
        except Exception:
            segmentation.RemoveSegment(segmentId)  # no half-written segment without its turn
            raise
        return segmentId

    # -- backend -------------------------------------------------------------------
    def _backendFactory(self, config):
        """A function (run in the background thread) that returns the backend for ``config``."""
        kind = config.get("kind")
        if kind == support.BACKEND_REMOTE:
            url = config.get("url", "")
            if not url:
                raise ValueError(_("Enter the worker URL (Inference backend section)."))
            key = ("remote", url, config.get("token", ""))
        else:
            path = config.get("model_path", "")
            if not path:
                raise ValueError(
                    _("No model is configured: choose the model description file (model.json) in the Inference backend section.")
                )
            if not os.path.isfile(path):
                raise ValueError(_("The model description file {path} does not exist.").format(path=path))
            missing = support.missing_requirements(support.BACKEND_LOCAL)
            if missing:
                raise ValueError(
                    _("Local inference needs {packages}: click 'Install dependencies'.").format(
                        packages=", ".join(missing.describe())
                    )
                )
            key = ("local", os.path.abspath(path), config.get("device", "auto"))
        if key == self._backendKey and self._backend is not None:
            backend = self._backend
            return key, lambda: backend

        def create():
            if kind == support.BACKEND_REMOTE:
                from MultiTurnSegLib.backends.remote import RemoteBackend

                return RemoteBackend(key[1], token=key[2] or None)
            from MultiTurnSegLib.backends.local import LocalBackend

            return LocalBackend.from_model_json(key[1], device=key[2])

        return key, create

    def closeBackend(self):
        backend, self._backend, self._backendKey = self._backend, None, None
        if backend is not None:
            try:
                backend.close()
            except Exception as exc:  # closing must not fail the GUI
                logging.warning("MultiTurnSeg: closing the backend failed: %s", exc)

    def _adoptBackend(self, key, backend):
        if key != self._backendKey:
            self.closeBackend()
            self._backend, self._backendKey = backend, key

    def startTestConnection(self, config):
        if config.get("kind") != support.BACKEND_REMOTE:
            raise ValueError(_("Test connection is for a remote worker."))
        key, create = self._backendFactory(config)

        def run(progress):
            progress("connecting", 0.1)
            backend = create()
            return key, backend, backend.test_connection()

        return support.BackgroundTask(run, name="MultiTurnSeg test connection", kind="test-connection").start()

    # -- turns ---------------------------------------------------------------------
    def startTurn(self, prompt, referenceChoice, backendConfig, jcm="always"):
        """Prepare a turn in the main thread and start it in the background; return the task.

        referenceChoice: support.REFERENCE_AUTO, support.REFERENCE_NONE or "segment:<segment id>".
        """
        from MultiTurnSegLib.conversation import ChatSession, Conversation, Reference

        volumeNode = self.inputVolume()
        if volumeNode is None:
            raise ValueError(_("Select an input volume."))
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        sliceViewName = parameterNode.GetParameter("SliceView") or "Red"
        window = parameterNode.GetParameter("WindowPreset") or "auto"
        volume = self.volumeFromNode(volumeNode)
        axis, index = self.sliceShownInView(volume, sliceViewName)
        # The conversation of the slice shown (continued), or a new one on it.
        sliceKey = (volumeNode.GetID(), axis, int(index))
        self.shownSlice, self.shownSliceError = sliceKey, ""
        base = self.conversationOn(sliceKey)
        conversation = base
        if conversation is not None and conversation.turns:
            window = conversation.window or window
        from MultiTurnSegLib import imaging

        image = imaging.render_slice(volume, axis, index, window)
        key, createBackend = self._backendFactory(backendConfig)  # before the scene changes: settings errors first
        if conversation is None or not conversation.turns:
            conversation = Conversation(
                volume=volumeNode.GetID(), axis=axis, slice_index=index, image_size=tuple(image.shape[:2]), window=window
            )

        segmentationNode = self.segmentationNode(create=True)
        if segmentationNode.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        namesAndIds = self.segmentNamesAndIds(segmentationNode)
        idOfName = {name: segmentId for segmentId, name in namesAndIds}
        names = [name for _segmentId, name in namesAndIds]

        # Resolve the reference here (main thread): the referenced segment's
        # CURRENT content on this slice is read from the scene, so hand edits
        # count. A round whose segment still exists refers to that segment.
        explicit = None
        if referenceChoice == support.REFERENCE_NONE:
            explicit = "none"
        elif isinstance(referenceChoice, str) and referenceChoice.startswith("segment:"):
            segmentId = referenceChoice[len("segment:"):]
            segmentation: "vtkSegmentation" = segmentationNode.GetSegmentation()
            segment: "vtkSegment" = segmentation.GetSegment(segmentId)
            if segment is None:
                raise ValueError(_("The chosen reference segment no longer exists."))
            explicit = Reference.to_segment(segment.GetName())
        probe = ChatSession(None, image, conversation, segment_names=names)
        reference = probe.resolve(prompt, explicit)
        masks = {}
        if reference is not None and reference.kind == "round":
            turn = conversation.turn(reference.round)
            segmentId = self.turnSegmentId(segmentationNode, turn, conversation) if conversation is base else None
            if segmentId is not None:
                segmentation: "vtkSegmentation" = segmentationNode.GetSegmentation()
                segment: "vtkSegment" = segmentation.GetSegment(segmentId)
                reference = Reference.to_segment(segment.GetName())
                idOfName[segment.GetName()] = segmentId
        if reference is not None and reference.kind == "segment":
            segmentId = idOfName.get(reference.segment)
            if segmentId is not None:
                masks[reference.segment] = self.segmentMaskOnSlice(
                    segmentationNode, segmentId, volumeNode, volume, axis, index
                )

        # The background thread works on a copy: a cancelled or failed turn
        # leaves the conversation (and the scene) exactly as it was.
        working = conversation.copy()
        session_kwargs = {"segment_masks": masks, "segment_names": list(names) + list(masks), "jcm": jcm}
        firstStage = "loading model" if key != self._backendKey else "preparing"
        state = {}  # "backend" once created (kept even when the turn fails)

        def run(progress):
            progress(firstStage, 0.0)
            backend = createBackend()
            state["backend"] = (key, backend)
            session = ChatSession(backend, image, working, **session_kwargs)
            turn = session.ask(prompt, reference=reference if reference is not None else "none", progress=progress)
            return key, backend, turn

        task = support.BackgroundTask(run, kind="turn")
        self._pendingTurn = {
            "task": task,
            "state": state,
            "key": sliceKey,  # the turn belongs to this slice's conversation, wherever the view is when it ends
            "base": base,  # the slice's conversation when the turn started (None: none yet)
            "rounds": len(base.turns) if base is not None else 0,
            "conversation": conversation,  # base, or the new conversation the turn starts
            "volumeNodeId": volumeNode.GetID(),
            "segmentationNodeId": segmentationNode.GetID(),
        }
        return task.start()

    def finishTask(self, task):
        """Main thread: apply a finished background task to the scene; return a status message.

        Raises the task's error (the conversation and segments stay as they were).
        """
        if task.kind == "test-connection":
            if task.error is not None:
                raise task.error
            key, backend, _info = task.result
            self._adoptBackend(key, backend)
            return _("Worker reachable.")
        if task.kind == "propagation":
            return self._finishPropagation(task)
        from MultiTurnSegLib.conversation.segments import check_conversation_fits

        pending, self._pendingTurn = self._pendingTurn, None
        if pending is None or pending["task"] is not task:
            return ""
        if "backend" in pending["state"]:
            self._adoptBackend(*pending["state"]["backend"])  # keep a loaded model even when the turn failed
        if task.error is not None:
            if isinstance(task.error, support.Cancelled):
                return _("Turn cancelled.")
            raise task.error
        _key, _backend, turn = task.result
        if task.cancelled:
            return _("Turn cancelled; its result was discarded.")
        current = self.conversationOn(pending["key"])
        if current is not pending["base"] or (current is not None and len(current.turns) != pending["rounds"]):
            raise ValueError(_("The conversation changed while the turn was running; its result was discarded."))
        volumeNode: "vtkMRMLScalarVolumeNode" = slicer.mrmlScene.GetNodeByID(pending["volumeNodeId"])
        segmentationNode: "vtkMRMLSegmentationNode" = slicer.mrmlScene.GetNodeByID(pending["segmentationNodeId"])
        if volumeNode is None or segmentationNode is None:
            raise ValueError(_("The volume or segmentation was removed while the turn was running; result discarded."))
        conversation = pending["conversation"]
        volume = self.volumeFromNode(volumeNode)
        check_conversation_fits(conversation, volume)
        # Segment and turn together or neither: append validates the turn, a failed write takes it back.
        conversation.append(turn)
        try:
            self._writeTurnSegment(segmentationNode, volumeNode, volume, conversation, turn)
        except Exception:
            conversation.undo()
            raise
        if conversation is not pending["base"]:
            if pending["base"] is not None:
                self._removeConversation(pending["base"])  # an emptied conversation gives way to the new one
            self.conversations.append(conversation)
        self.saveConversations()
        text, low, _tip = support.jcm_text(turn.jcm_score, turn.jcm_refined)
        message = _("Round {round}: {name}").format(round=turn.round, name=turn.segment_name)
        if low:
            message += " - " + _("low JCM score {score}: check it").format(score=text)
        return message

    def runTurnAndWait(self, prompt, referenceChoice, backendConfig, timeout=600.0):
        """Start a turn and process events until it finishes (scripts and the self-test)."""
        task = self.startTurn(prompt, referenceChoice, backendConfig)
        conversation = self._pendingTurn["conversation"]  # the view may move meanwhile: the turn stays with it
        self._waitForTask(task, timeout, "the turn")
        last = conversation.turns[-1] if conversation.turns else None
        message = self.finishTask(task)
        turns = conversation.turns if self.conversationById(conversation.id) is conversation else []
        if not turns or turns[-1] is last:  # cancelled or discarded: no new turn to return
            raise RuntimeError(message or _("The turn produced no result."))
        return turns[-1]

    # -- propagation -----------------------------------------------------------------
    def propagationRecord(self, conversation=None):
        """The stored propagation of ``conversation`` (default: the current one) as a
        support.parse_propagation_record dict, or None."""
        conversation = conversation if conversation is not None else self.conversation
        if conversation is None:
            return None
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        return support.propagation_records(parameterNode.GetParameter(support.PARAMETER_PROPAGATION)).get(conversation.id)

    def _setPropagationRecord(self, conversationId, text):
        """Store (``text``: support.propagation_record) or remove ("") one conversation's propagation record."""
        parameterNode: "vtkMRMLScriptedModuleNode" = self.getParameterNode()
        records = support.propagation_records(parameterNode.GetParameter(support.PARAMETER_PROPAGATION))
        if not text and conversationId not in records:
            return
        records[conversationId] = text
        parameterNode.SetParameter(support.PARAMETER_PROPAGATION, support.propagation_records_text(records))

    def propagationSliceCount(self):
        """Number of slices of the input volume along the conversation's axis (0 without conversation or volume)."""
        from MultiTurnSegLib import imaging

        volumeNode = self.inputVolume()
        if self.conversation is None or volumeNode is None:
            return 0
        return imaging.num_slices(self.volumeFromNode(volumeNode), self.conversation.axis)

    def _propagationReferences(self, working, segmentIds, idOfName):
        """Prepare ``working`` (a copy of the conversation) for propagation; return {name: segment id} to read.

        A turn referred to an earlier round through that round's segment (by its
        name then). If the segment was renamed since, the library would not know
        it is the round: such references become round references again. Any
        other segment must still exist; its content is read from the scene.
        """
        from MultiTurnSegLib.conversation import Reference

        roundOfSegmentId = {segmentId: turn.round for segmentId, turn in zip(segmentIds, working.turns)}
        ownNames = set()
        needed = {}
        for turn in working.turns:
            reference = turn.reference
            if reference is not None and reference.kind == "segment" and reference.segment not in ownNames:
                segmentId = idOfName.get(reference.segment)
                if segmentId is None:
                    raise ValueError(
                        _(
                            "Round {round} refers to segment '{name}', which no longer exists: propagation needs its "
                            "content on every slice. Restore or rename a segment to '{name}', or start a new conversation."
                        ).format(round=turn.round, name=reference.segment)
                    )
                if roundOfSegmentId.get(segmentId, turn.round) < turn.round:
                    turn.reference = Reference.to_round(roundOfSegmentId[segmentId])
                else:
                    needed[reference.segment] = segmentId
            if turn.segment_name:
                ownNames.add(turn.segment_name)
        return needed

    def startPropagation(self, first, last, backendConfig, jcm="always"):
        """Replay the conversation on slices ``first``..``last`` (inclusive) in the background; return the task.

        Everything the scene must give is read here, in the main thread: the
        volume (copied) and the content of the segments the conversation refers
        to on each slice. :meth:`finishTask` writes the 3D masks into the
        conversation's segments.
        """
        import numpy as np

        from MultiTurnSegLib import imaging
        from MultiTurnSegLib.conversation import propagate, propagation_slices
        from MultiTurnSegLib.conversation.segments import check_conversation_fits

        conversation = self.conversation
        if conversation is None or not conversation.turns:
            raise ValueError(_("There is nothing to propagate yet: chat on a slice first."))
        volumeNode: "vtkMRMLScalarVolumeNode" = self.inputVolume()
        if volumeNode is None:
            raise ValueError(_("Select an input volume."))
        if conversation.volume != volumeNode.GetID():
            raise ValueError(
                _("This conversation is about another volume ({volume}); select it as the input volume to propagate.").format(
                    volume=conversation.volume
                )
            )
        segmentationNode: "vtkMRMLSegmentationNode" = self.segmentationNode()
        if segmentationNode is None:
            raise ValueError(_("Select the segmentation that holds the conversation's segments."))
        segmentIds = []
        for turn in conversation.turns:
            segmentId = self.turnSegmentId(segmentationNode, turn, conversation)
            if segmentId is None:
                raise ValueError(
                    _(
                        "The segment of round {round} ({name}) was deleted: propagation writes into the conversation's "
                        "segments. Undo back to before that round, or start a new conversation."
                    ).format(round=turn.round, name=turn.segment_name)
                )
            segmentIds.append(segmentId)

        sceneVolume = self.volumeFromNode(volumeNode)
        check_conversation_fits(conversation, sceneVolume)
        axis = conversation.axis
        slices = propagation_slices(sceneVolume, axis, (int(first), int(last)))
        # The background thread gets its own copy of the voxels (the node's array may change or go away).
        volume = imaging.volume_from_array(np.array(sceneVolume.array), sceneVolume.ijk_to_lps, source=sceneVolume.source)

        working = conversation.copy()
        idOfName = {name: segmentId for segmentId, name in self.segmentNamesAndIds(segmentationNode)}
        needed = self._propagationReferences(working, segmentIds, idOfName)
        sliceMasks = {}
        for name, segmentId in needed.items():
            labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            for k in slices:
                if k != conversation.slice_index:
                    sliceMasks[(name, k)] = imaging.extract_mask(labelmap, sceneVolume, axis, k)

        def segmentMasks(name, maskAxis, index):
            return sliceMasks.get((name, index))

        key, createBackend = self._backendFactory(backendConfig)
        firstStage = "loading model" if key != self._backendKey else "preparing"
        state = {}  # "task", and "backend" once created (kept even when propagation fails)

        def run(progress):
            progress(firstStage, 0.0)
            backend = createBackend()
            state["backend"] = (key, backend)

            def reportProgress(done, total):
                progress(f"slice {done} of {total}", (done / total) if total else 1.0)

            result = propagate(
                backend, volume, working, list(slices), jcm=jcm,
                segment_masks=segmentMasks if needed else None,
                progress=reportProgress, cancel=lambda: state["task"].cancelled,
            )
            return key, backend, result

        task = support.BackgroundTask(run, name="MultiTurnSeg propagation", kind="propagation")
        state["task"] = task
        self._pendingPropagation = {
            "task": task,
            "state": state,
            "conversation": conversation,
            "rounds": len(conversation.turns),
            "first": int(first),
            "last": int(last),
            "volumeNodeId": volumeNode.GetID(),
            "segmentationNodeId": segmentationNode.GetID(),
        }
        return task.start()

    def _finishPropagation(self, task):
        """Main thread: write a finished propagation into the conversation's segments (all or nothing)."""
        import numpy as np

        from MultiTurnSegLib import imaging
        from MultiTurnSegLib.conversation import PropagationCancelled

        pending, self._pendingPropagation = self._pendingPropagation, None
        if pending is None or pending["task"] is not task:
            return ""
        if "backend" in pending["state"]:
            self._adoptBackend(*pending["state"]["backend"])  # keep a loaded model even when propagation failed
        if task.error is not None:
            if isinstance(task.error, (support.Cancelled, PropagationCancelled)):
                return _("Propagation cancelled; the segments and the conversation were not changed.")
            raise task.error
        _key, _backend, result = task.result
        if task.cancelled:
            return _("Propagation cancelled; its result was discarded and nothing was changed.")
        conversation = pending["conversation"]
        if self.conversationById(conversation.id) is not conversation or len(conversation.turns) != pending["rounds"]:
            raise ValueError(_("The conversation changed while propagating; the result was discarded."))
        volumeNode: "vtkMRMLScalarVolumeNode" = slicer.mrmlScene.GetNodeByID(pending["volumeNodeId"])
        segmentationNode: "vtkMRMLSegmentationNode" = slicer.mrmlScene.GetNodeByID(pending["segmentationNodeId"])
        if volumeNode is None or segmentationNode is None:
            raise ValueError(_("The volume or segmentation was removed while propagating; the result was discarded."))
        volume = self.volumeFromNode(volumeNode)
        axis, source = conversation.axis, conversation.slice_index
        if any(tuple(mask3d.shape) != tuple(volume.shape) for mask3d in result.masks):
            raise ValueError(_("The volume changed while propagating; the result was discarded."))

        # Check and prepare everything before writing anything: all segments or none change.
        labelmaps = []
        wholeSlice = np.ones(imaging.slice_shape(volume, axis), dtype=bool)
        for turn, mask3d in zip(conversation.turns, result.masks):
            segmentId = self.turnSegmentId(segmentationNode, turn, conversation)
            if segmentId is None:
                raise ValueError(
                    _("The segment of round {round} ({name}) was deleted while propagating; nothing was changed.").format(
                        round=turn.round, name=turn.segment_name
                    )
                )
            labelmap = mask3d.astype(np.uint8)
            # The conversation's own slice keeps the segment's current content (hand edits included).
            current = self.segmentMaskOnSlice(segmentationNode, segmentId, volumeNode, volume, axis, source)
            imaging.insert_mask(labelmap, volume, axis, source, wholeSlice, 0)
            imaging.insert_mask(labelmap, volume, axis, source, current, 1)
            labelmaps.append((segmentId, labelmap))
        for segmentId, labelmap in labelmaps:
            # Replaces the segment's content only: its name, colour, tags and terminology stay.
            slicer.util.updateSegmentBinaryLabelmapFromArray(labelmap, segmentationNode, segmentId, volumeNode)

        flagged = result.flagged()
        self._setPropagationRecord(
            conversation.id,
            support.propagation_record(
                conversation.id, axis, source, pending["first"], pending["last"], result.slices, len(result.masks), flagged
            ),
        )
        self.lastPropagation = result
        message = _("Propagated {rounds} round(s) to {axis} slices {first}..{last} ({count} slices).").format(
            rounds=len(result.masks), axis=axis, first=pending["first"], last=pending["last"], count=len(result.slices)
        )
        if flagged:
            message += " " + _("The JCM head corrected a poor answer on: {flagged}. Check these slices.").format(
                flagged=support.flagged_text(flagged)
            )
        else:
            message += " " + _("No answer was corrected by the JCM head.")
        return message

    def runPropagationAndWait(self, first, last, backendConfig, timeout=1200.0):
        """Start a propagation and process events until it finishes (scripts and the self-test); return the message."""
        task = self.startPropagation(first, last, backendConfig)
        self._waitForTask(task, timeout, "the propagation")
        return self.finishTask(task)

    @staticmethod
    def _waitForTask(task, timeout, what):
        """Keep Slicer's events flowing until ``task`` is done; cancel it after ``timeout`` seconds."""
        import time

        deadline = time.monotonic() + timeout
        while not task.done:
            slicer.app.processEvents()
            task.wait(0.05)
            if time.monotonic() > deadline:
                task.cancel()
                raise TimeoutError(f"{what} did not finish in {timeout:.0f} s")

    def undoLastTurn(self):
        """Remove the last turn of the current slice's conversation and its segment (other slices' stay)."""
        conversation = self.conversation
        if conversation is None or not conversation.turns:
            raise ValueError(_("There is no turn to undo."))
        segmentationNode: "vtkMRMLSegmentationNode" = self.segmentationNode()
        turn = conversation.turns[-1]
        if segmentationNode is not None:
            segmentId = self.turnSegmentId(segmentationNode, turn, conversation)
            if segmentId is not None:
                segmentation: "vtkSegmentation" = segmentationNode.GetSegmentation()
                segmentation.RemoveSegment(segmentId)
        record = self.propagationRecord(conversation)
        conversation.undo()
        if not conversation.turns:
            self._removeConversation(conversation)  # nothing left: the slice has no conversation any more
        self.saveConversations()
        # The remaining rounds' segments stay 3D; a later round must not pass for propagated.
        truncated = support.truncated_propagation_record(record, len(conversation.turns))
        if truncated is not None:
            self._setPropagationRecord(conversation.id, truncated)
        return turn

    # -- export --------------------------------------------------------------------
    def exportSegmentation(self, target, dicom=False):
        segmentationNode: "vtkMRMLSegmentationNode" = self.segmentationNode()
        if segmentationNode is None:
            raise ValueError(_("Select a segmentation to export."))
        if not dicom:
            path = target if target.endswith(".seg.nrrd") else target + ".seg.nrrd"
            if not slicer.util.saveNode(segmentationNode, path):
                raise RuntimeError(_("Writing {path} failed.").format(path=path))
            return path
        return self._exportDicomSeg(segmentationNode, target)

    def _exportDicomSeg(self, segmentationNode: "vtkMRMLSegmentationNode", directory):
        """DICOM-SEG through the library (needs a volume loaded from DICOM, and highdicom)."""
        import shutil

        import numpy as np

        volumeNode: "vtkMRMLScalarVolumeNode" = self.inputVolume()
        instanceUids = volumeNode.GetAttribute("DICOM.instanceUIDs") if volumeNode else None
        if not instanceUids:
            raise ValueError(_("DICOM-SEG export needs the input volume to be loaded from DICOM (DICOM module)."))
        missing = support.missing_requirements(support.BACKEND_REMOTE, dicom=True)
        if missing:
            raise ValueError(
                _("DICOM-SEG export needs {packages}: click 'Install dependencies'.").format(packages=", ".join(missing.pip))
            )
        from MultiTurnSegLib.export.dicom_seg import write_dicom_seg
        from MultiTurnSegLib.segmentation_io import Segment, Segmentation

        volume = self.volumeFromNode(volumeNode)
        segments = []
        segmentation: "vtkSegmentation" = segmentationNode.GetSegmentation()
        for segmentId, name in self.segmentNamesAndIds(segmentationNode):
            segment: "vtkSegment" = segmentation.GetSegment(segmentId)
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            tags = {}
            if segment.HasTerminology():
                tags["TerminologyEntry"] = segment.GetTerminology()
            segments.append(Segment(id=segmentId, name=name, color=tuple(segment.GetColor()), mask=np.asarray(mask) != 0, tags=tags))
        exportable = Segmentation(ijk_to_lps=volume.ijk_to_lps, shape=volume.shape, segments=segments)
        output = os.path.join(directory, segmentationNode.GetName() + ".dcm")
        with tempfile.TemporaryDirectory() as seriesDir:
            # The series' files may be spread over the DICOM database: gather them in one folder.
            for i, uid in enumerate(instanceUids.split()):
                source = slicer.dicomDatabase.fileForInstance(uid)
                if not source:
                    raise ValueError(_("The DICOM file of instance {uid} is not in the DICOM database.").format(uid=uid))
                shutil.copy(source, os.path.join(seriesDir, f"{i:05d}.dcm"))
            write_dicom_seg(exportable, seriesDir, output)
        return output

    # -- dependencies --------------------------------------------------------------
    def installDependencies(self, missing):
        """Install what ``missing`` (support.MissingPackages) lists; main thread (pip shows a dialog)."""
        if missing.torch:
            if not hasattr(slicer.modules, "pytorchutils"):
                raise RuntimeError(
                    _("Install the PyTorch extension (Extensions Manager), restart Slicer, then try again.")
                )
            import PyTorchUtils

            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=">=2.1")
            if torch is None:
                raise RuntimeError(_("PyTorch was not installed."))
        if missing.pip:
            slicer.util.pip_install(list(missing.pip), requester=MODULE_NAME)


#
# MultiTurnSegTest
#


class MultiTurnSegTest(ScriptedLoadableModuleTest):
    """Three-turn conversation with a tiny random model on a sample CT, propagated to 3 slices, and a
    second conversation on another slice; both come back after the scene is saved and reloaded.

    Needs the library's dependencies (torch, transformers, ...) and network
    access for the sample data. Runs from Developer Mode "Reload and Test" and
    as the ctest py_MultiTurnSeg.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ThreeTurnConversation()

    def _setUpInputs(self) -> "vtkMRMLScalarVolumeNode":
        import SampleData

        volumeNode: "vtkMRMLScalarVolumeNode" = SampleData.SampleDataLogic().downloadSample("CTChest")
        self.assertIsNotNone(volumeNode)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Chat")
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)
        return volumeNode

    def test_ThreeTurnConversation(self):
        import numpy as np

        missing = support.missing_requirements(support.BACKEND_LOCAL)
        self.assertFalse(
            missing, "Install the dependencies first (MultiTurnSeg panel > Install dependencies): " + ", ".join(missing.describe())
        )
        from MultiTurnSegLib import imaging
        from MultiTurnSegLib.engine.random_weights import build_random_model

        self.delayDisplay("Building a tiny random model")
        modelJson = str(build_random_model(os.path.join(slicer.app.temporaryPath, "MultiTurnSeg-random-model")))
        config = {"kind": support.BACKEND_LOCAL, "model_path": modelJson, "device": "cpu", "url": "", "token": ""}

        volumeNode: "vtkMRMLScalarVolumeNode" = self._setUpInputs()
        segmentationNode: "vtkMRMLSegmentationNode" = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSegmentationNode")
        logic = MultiTurnSegLogic()
        logic.setInputs(volumeNode, segmentationNode, "Red", "lung")
        volume = logic.volumeFromNode(volumeNode)
        axis, index = logic.sliceShownInView(volume, "Red")
        self.assertEqual(axis, "axial")

        # An unrelated, hand-drawn segment (on the conversation's slice and on
        # another one) must stay untouched by the turns' new segments.
        unrelated = np.zeros(volume.shape, dtype=np.uint8)
        otherIndex = 0 if index > 0 else 1
        block = np.zeros(imaging.slice_shape(volume, axis), dtype=bool)
        block[10:30, 10:30] = True
        imaging.insert_mask(unrelated, volume, axis, otherIndex, block, 1)
        imaging.insert_mask(unrelated, volume, axis, index, block, 1)
        segmentation: "vtkSegmentation" = segmentationNode.GetSegmentation()
        unrelatedId = segmentation.AddEmptySegment("hand_drawn", "Hand drawn", [0.2, 0.2, 0.9])
        slicer.util.updateSegmentBinaryLabelmapFromArray(unrelated, segmentationNode, unrelatedId, volumeNode)
        unrelatedBefore = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, unrelatedId, volumeNode).copy()

        self.delayDisplay("Round 1")
        turn1 = logic.runTurnAndWait("Segment the liver in this abdominal CT slice.", support.REFERENCE_AUTO, config)
        self.assertTrue(turn1.segment_name.startswith("R1"), turn1.segment_name)

        # Hand-edit round 1's segment on the slice: round 2 must refer to the edited content.
        r1Id = logic.turnSegmentId(segmentationNode, turn1)
        self.assertIsNotNone(r1Id)
        edited = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, r1Id, volumeNode)
        edit2d = imaging.extract_mask(edited, volume, axis, index)
        edit2d[:, :] = False
        edit2d[40:80, 50:120] = True
        edited[:] = 0
        imaging.insert_mask(edited, volume, axis, index, edit2d, 1)
        slicer.util.updateSegmentBinaryLabelmapFromArray(edited, segmentationNode, r1Id, volumeNode)

        self.delayDisplay("Round 2 (refers to round 1)")
        turn2 = logic.runTurnAndWait("Segment the organ located posterior to the previous output.", support.REFERENCE_AUTO, config)
        self.assertTrue(turn2.segment_name.startswith("R2"), turn2.segment_name)
        self.assertIsNotNone(turn2.reference)
        self.assertTrue(np.array_equal(turn2.reference_mask, edit2d), "round 2 must refer to the edited round-1 segment")

        self.delayDisplay("Round 3 (explicit: no reference)")
        turn3 = logic.runTurnAndWait("Segment the spleen.", support.REFERENCE_NONE, config)
        self.assertTrue(turn3.segment_name.startswith("R3"), turn3.segment_name)
        self.assertIsNone(turn3.reference)

        # Segments: names, masks only on the conversation's slice, unrelated segment intact.
        for turn in logic.conversation.turns:
            segmentId = logic.turnSegmentId(segmentationNode, turn)
            self.assertIsNotNone(segmentId)
            segment: "vtkSegment" = segmentation.GetSegment(segmentId)
            self.assertEqual(segment.GetName(), turn.segment_name)
            array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
            onSlice = imaging.extract_mask(array, volume, axis, index)
            self.assertEqual(int(array.astype(bool).sum()), int(onSlice.sum()), "a turn's segment must lie on its slice only")
        unrelatedAfter = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, unrelatedId, volumeNode)
        self.assertTrue(np.array_equal(unrelatedBefore.astype(bool), unrelatedAfter.astype(bool)))

        self.delayDisplay("Undo")
        r3Id = logic.turnSegmentId(segmentationNode, turn3)
        logic.undoLastTurn()
        self.assertEqual(len(logic.conversation.turns), 2)
        self.assertIsNone(segmentation.GetSegment(r3Id))

        self.delayDisplay("Round 3 again (refers to the hand-drawn segment)")
        turn3 = logic.runTurnAndWait("Segment the structure inside the selected region.", "segment:" + unrelatedId, config)
        self.assertIsNotNone(turn3.reference)
        self.assertEqual(turn3.reference.segment, "Hand drawn")
        turns = list(logic.conversation.turns)
        self.assertEqual(len(turns), 3)
        turnIds = [logic.turnSegmentId(segmentationNode, turn) for turn in turns]

        def segmentArrays():
            return {
                segmentId: slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode).astype(bool)
                for segmentId, _name in logic.segmentNamesAndIds(segmentationNode)
            }

        def slicesWithContent(array):
            count = imaging.num_slices(volume, axis)
            return [k for k in range(count) if imaging.extract_mask(array, volume, axis, k).any()]

        self.delayDisplay("Propagation, cancelled: nothing changes")
        before = segmentArrays()
        conversationBefore = logic.conversation.copy()
        first = max(0, index - 1)
        last = min(imaging.num_slices(volume, axis) - 1, first + 2)
        first = last - 2
        task = logic.startPropagation(first, last, config)
        task.cancel()
        self.assertTrue(task.wait(600))
        message = logic.finishTask(task)
        self.assertIn("cancelled", message.lower())
        after = segmentArrays()
        self.assertEqual(sorted(before), sorted(after))
        for segmentId in before:
            self.assertTrue(np.array_equal(before[segmentId], after[segmentId]), segmentId)
        self.assertEqual(logic.conversation, conversationBefore)
        self.assertIsNone(logic.propagationRecord())

        self.delayDisplay(f"Propagation to {axis} slices {first}..{last}")
        message = logic.runPropagationAndWait(first, last, config)
        self.assertIn("Propagated 3 round(s)", message)
        result = logic.lastPropagation
        self.assertIsNotNone(result)
        self.assertEqual(list(result.slices), [first, first + 1, first + 2])
        self.assertEqual(logic.conversation, conversationBefore, "propagation must not change the conversation")
        after = segmentArrays()
        for turn, segmentId, mask3d in zip(turns, turnIds, result.masks):
            self.assertEqual(logic.turnSegmentId(segmentationNode, turn), segmentId)
            segment: "vtkSegment" = segmentation.GetSegment(segmentId)
            self.assertEqual(segment.GetName(), turn.segment_name)
            self.assertTrue(np.allclose(segment.GetColor(), turn.color))
            self.assertTrue(segment.HasTag("MultiTurnSeg.Round"))
            self.assertEqual(slicesWithContent(after[segmentId]), [first, first + 1, first + 2], turn.segment_name)
            for k in result.slices:
                expected = imaging.extract_mask(before[segmentId] if k == index else mask3d, volume, axis, k)
                self.assertTrue(np.array_equal(imaging.extract_mask(after[segmentId], volume, axis, k), expected))
        # Round 1 keeps its hand edit on the conversation's slice; the hand-drawn segment is untouched.
        self.assertTrue(np.array_equal(imaging.extract_mask(after[turnIds[0]], volume, axis, index), edit2d))
        self.assertTrue(np.array_equal(after[unrelatedId], unrelatedBefore.astype(bool)))
        record = logic.propagationRecord()
        self.assertIsNotNone(record)
        self.assertEqual((record["first"], record["last"], record["rounds"]), (first, last, 3))

        self.delayDisplay("A second conversation, on another slice")
        firstConversation = logic.conversation
        otherSlice = last + 3 if last + 3 < imaging.num_slices(volume, axis) else first - 3
        logic.showSlice(axis, otherSlice)
        self.assertIsNone(logic.conversation, "a slice without a conversation has no current conversation")
        other1 = logic.runTurnAndWait("Segment the aorta.", support.REFERENCE_NONE, config)
        second = logic.conversation
        self.assertIsNot(second, firstConversation)
        self.assertEqual((second.axis, second.slice_index, len(second.turns)), (axis, otherSlice, 1))
        self.assertEqual(len(firstConversation.turns), 3, "the first slice's conversation must stay as it was")
        self.assertIsNone(logic.propagationRecord(second))
        logic.showConversationSlice(firstConversation)
        self.assertIs(logic.conversation, firstConversation)

        self.delayDisplay("Save and reload the scene")
        sceneFile = os.path.join(slicer.app.temporaryPath, "MultiTurnSegSelfTest.mrb")
        self.assertTrue(slicer.util.saveScene(sceneFile))
        conversationId = logic.conversation.id
        secondId = second.id
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(sceneFile)
        reloaded = MultiTurnSegLogic()
        self.assertEqual(sorted(c.id for c in reloaded.loadConversations()), sorted([conversationId, secondId]))
        conversation = reloaded.conversationById(conversationId)
        self.assertIsNotNone(conversation, "the conversation must be restored from the scene")
        secondReloaded = reloaded.conversationById(secondId)
        self.assertIsNotNone(secondReloaded, "the second slice's conversation must be restored from the scene")
        self.assertEqual((secondReloaded.slice_index, [t.segment_name for t in secondReloaded.turns]), (otherSlice, [other1.segment_name]))
        self.assertEqual(conversation.id, conversationId)
        self.assertEqual(
            [t.segment_name for t in conversation.turns], [turn1.segment_name, turn2.segment_name, turn3.segment_name]
        )
        self.assertEqual(conversation.turns[1].reference, turn2.reference)
        self.assertTrue(np.array_equal(conversation.turns[1].reference_mask, edit2d))
        reloadedSegmentation = reloaded.segmentationNode()
        self.assertIsNotNone(reloadedSegmentation)
        reloadedVolume: "vtkMRMLScalarVolumeNode" = reloaded.inputVolume()
        for turn in conversation.turns:
            segmentId = reloaded.turnSegmentId(reloadedSegmentation, turn, conversation)
            self.assertIsNotNone(segmentId)
            array = slicer.util.arrayFromSegmentBinaryLabelmap(reloadedSegmentation, segmentId, reloadedVolume)
            self.assertEqual(slicesWithContent(array), [first, first + 1, first + 2], turn.segment_name)
        self.assertIsNotNone(reloaded.turnSegmentId(reloadedSegmentation, secondReloaded.turns[0], secondReloaded))
        record = reloaded.propagationRecord(conversation)
        self.assertIsNotNone(record, "the propagated range must be restored from the scene")
        self.assertEqual((record["first"], record["last"]), (first, last))
        widget = slicer.util.getModuleWidget(MODULE_NAME) if slicer.util.mainWindow() else None
        if widget is not None:
            widget.initializeFromScene()
            widget.logic.showConversationSlice(widget.logic.conversationById(conversationId))
            widget.onShownSliceModified()
            self.assertEqual(widget.ui.chatHistoryTable.rowCount, 3)
            self.assertEqual(widget.ui.conversationSliceSelector.count, 2)
            self.assertEqual(
                (widget.ui.propagateFirstSliceSpinBox.value, widget.ui.propagateLastSliceSpinBox.value), (first, last)
            )
        self.delayDisplay("Test passed")
